// Device helpers shared by the CUDA kernels: reading a float array of any supported
// dtype as double and writing float32/float64 results, with the dtype picked at run
// time. The branch is uniform across a launch, and the kernels that use these helpers
// are bound by memory traffic, so one instantiation per kernel costs nothing measurable
// and keeps the build short. Also the device side of the index checks (error words).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>

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

// ---------------------------------------------------------------- index checks
// The device side of the checks in common.h. A kernel checks every index and offset where it
// reads it and never reads or writes through a bad one: it skips the entry, writes NaN into the
// outputs the entry would have filled, and reports its position in an error word. An error word
// is an int64 in device memory that the kernels only ever lower (atomicMin), so after a call it
// holds the first bad position that call saw; the caller sets it to kNoError beforehand, and one
// word can collect the calls of a whole training step. Nothing here synchronises with the host,
// and nothing traps: a device-side assert would leave the CUDA context unusable.
constexpr int64_t kNoError = INT64_MAX;

__device__ __forceinline__ bool in_range_dev(int64_t i, int64_t size) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(size);
}

__device__ __forceinline__ bool pair_ok_dev(int64_t begin, int64_t end, int64_t total) {
  return 0 <= begin && begin <= end && end <= total;
}

__device__ __forceinline__ int64_t clamp_dev(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Lowers *word to pos. The plain read first keeps a call full of bad entries from queuing every
// thread on one atomic: the word only decreases, so a stale read can only send a thread to the
// atomic, never make it skip a smaller position.
__device__ __forceinline__ void report_bad(int64_t* word, int64_t pos) {
  if (pos < *reinterpret_cast<volatile int64_t*>(word))
    atomicMin(reinterpret_cast<long long*>(word), static_cast<long long>(pos));
}

__device__ __forceinline__ double nan_dev() { return __longlong_as_double(0x7ff8000000000000LL); }

// The host side: a kernel that reports must be given its words.
inline void require_error_words(uintptr_t err) {
  if (err == 0) throw std::invalid_argument("err: the kernels need a device pointer to their error words");
}

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
