// Shared helpers of the steppo_fast compiled modules: dtype codes and scalar
// conversions. Python checks dtype, device, contiguity and shapes before any call
// and passes raw pointers; these modules never see a torch tensor.
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace steppo {

// Dtype codes shared with steppo_fast/_native.py (DTYPE_CODES there).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kInt32 = 4, kInt64 = 5 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown";
  }
}

[[noreturn]] inline void bad_dtype(const char* arg, int code) {
  throw std::invalid_argument(std::string(arg) + ": unsupported dtype code " + std::to_string(code) + " (" +
                              dtype_name(code) + ")");
}

// bfloat16 / float16 bit patterns to float on the host.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Reads element i of a float array of any supported dtype as double.
inline double load_as_double(const void* p, int code, int64_t i) {
  switch (code) {
    case kFloat32: return static_cast<const float*>(p)[i];
    case kFloat64: return static_cast<const double*>(p)[i];
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: bad_dtype("input", code);
  }
}

// An output buffer that the kernel touches first (a fresh torch.empty): ask Linux to back it with
// huge pages (when transparent huge pages are in "madvise" mode), so that writing it costs one page
// fault per 2 MiB instead of one per 4 KiB. Advisory only; errors are ignored.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace steppo
