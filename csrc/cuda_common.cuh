// Device helpers shared by the CUDA kernels: reading a float array of any supported
// dtype as double and writing float32/float64 results, with the dtype picked at run
// time. The branch is uniform across a launch, and the kernels that use these helpers
// are bound by memory traffic, so one instantiation per kernel costs nothing measurable
// and keeps the build short.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"

namespace steppo {

// A read-only float array of dtype `code` (kFloat32, kFloat64, kBFloat16 or kFloat16).
struct DevIn {
  const void* p;
  int code;
  __device__ __forceinline__ double operator[](int64_t i) const {
    switch (code) {
      case kFloat32: return static_cast<const float*>(p)[i];
      case kFloat64: return static_cast<const double*>(p)[i];
      case kBFloat16: return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
      default: return __half2float(__ushort_as_half(static_cast<const uint16_t*>(p)[i]));
    }
  }
};

// A float32 or float64 output array.
struct DevOut {
  void* p;
  int code;
  __device__ __forceinline__ void set(int64_t i, double v) const {
    if (code == kFloat64) {
      static_cast<double*>(p)[i] = v;
    } else {
      static_cast<float*>(p)[i] = static_cast<float>(v);
    }
  }
};

inline void check_in_dtype(const char* name, int code) {
  if (code != kFloat32 && code != kFloat64 && code != kBFloat16 && code != kFloat16) bad_dtype(name, code);
}

inline void check_out_dtype(const char* name, int code) {
  if (code != kFloat32 && code != kFloat64) bad_dtype(name, code);
}

// Blocks for a grid-stride loop over n items: enough to fill any current GPU, capped so the
// grid size is always valid.
inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535) {
  int64_t b = (n + threads - 1) / threads;
  if (b > cap) b = cap;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b);
}

}  // namespace steppo
