// pybind11 module steppo_fast._C_cuda: the CUDA kernels. It links the CUDA
// runtime statically, so it imports without a GPU; every entry point checks for a
// usable device first and raises RuntimeError when there is none.
#include <pybind11/pybind11.h>

#include "cuda_check.cuh"
#include "step_rewards_cuda.h"

namespace py = pybind11;

static int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

static int runtime_version() {
  int v = 0;
  STEPPO_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "steppo_fast CUDA kernels";
  m.def("device_count", &device_count, "Number of usable CUDA devices (0 without a GPU or driver).");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the module was linked with.");
  m.def("step_rewards_cuda", &steppo::step_rewards_cuda, py::arg("rewards"), py::arg("rewards_dtype"),
        py::arg("step_tokens"), py::arg("step_token_offsets"), py::arg("num_steps"), py::arg("out"),
        py::arg("out_dtype"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Per-step sum of token rewards over a CSR token list (SPEC section 3).");
}
