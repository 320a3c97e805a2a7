// Error checking for the CUDA module: every runtime call goes through
// STEPPO_CUDA_CHECK and every launch is followed by STEPPO_CUDA_CHECK_LAUNCH,
// which raise std::runtime_error (RuntimeError in Python) naming the call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace steppo {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("steppo_fast._C_cuda: ") + what + " failed at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                             ")");
  }
}

// Raises a clear error when no CUDA device can be used (no GPU, no driver).
inline void require_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error of the failed query
    throw std::runtime_error(std::string("steppo_fast._C_cuda: no usable CUDA device (cudaGetDeviceCount: ") +
                             (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")");
  }
}

// Makes `device` current for one call of the module and restores the caller's device when the
// call returns or throws: the tensors' device is used without changing the current device that
// PyTorch and every other library in the process rely on. Raises first when no device is usable.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    require_device();
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice", __FILE__, __LINE__);
    if (previous_ != device) {
      cuda_check(cudaSetDevice(device), "cudaSetDevice", __FILE__, __LINE__);
      switched_ = true;
    }
  }
  // A destructor cannot throw: restoring a device that was current a moment ago does not fail
  // short of a dead context, and then the next checked call reports it.
  ~DeviceGuard() {
    if (switched_) static_cast<void>(cudaSetDevice(previous_));
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace steppo

#define STEPPO_CUDA_CHECK(expr) ::steppo::cuda_check((expr), #expr, __FILE__, __LINE__)
#define STEPPO_CUDA_CHECK_LAUNCH(name) ::steppo::cuda_check(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
