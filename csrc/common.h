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

// ---------------------------------------------------------------- index checks
// Every kernel checks each index and offset it reads against the sizes it is given, and never
// reads or writes outside them, whatever the caller passes. A bad one is reported as
// std::invalid_argument (ValueError in Python) naming the argument and the first bad position.
// Inside a parallel loop the bad entry is skipped, its position collected by a min-reduction,
// and the error thrown after the loop (an exception must not leave an OpenMP region).

// True when 0 <= i < size, in one unsigned comparison.
inline bool in_range(int64_t i, int64_t size) { return static_cast<uint64_t>(i) < static_cast<uint64_t>(size); }

[[noreturn]] inline void bad_index(const char* name, int64_t pos, int64_t value, const std::string& what) {
  throw std::invalid_argument(std::string(name) + "[" + std::to_string(pos) + "] = " + std::to_string(value) +
                              " " + what);
}

// CSR offsets off[0..count] over an array of `total` entries: off[0] == 0 and off[count] == total
// (the O(1) part; each pair off[i] <= off[i+1] is checked where it is read, see pair_ok).
inline void check_csr_ends(const char* name, const int64_t* off, int64_t count, int64_t total, const char* of_what) {
  if (count < 0) throw std::invalid_argument(std::string(name) + " must hold at least one offset");
  if (off[0] != 0) bad_index(name, 0, off[0], "must be 0 (CSR offsets start at 0)");
  if (off[count] != total)
    bad_index(name, count, off[count],
              "must equal the number of " + std::string(of_what) + " (" + std::to_string(total) + ")");
}

// One pair of CSR offsets: 0 <= begin <= end <= total.
inline bool pair_ok(int64_t begin, int64_t end, int64_t total) { return 0 <= begin && begin <= end && end <= total; }

[[noreturn]] inline void bad_pair(const char* name, int64_t pos, const int64_t* off, int64_t total) {
  throw std::invalid_argument(std::string(name) + " must be non-decreasing offsets in [0, " + std::to_string(total) +
                              "], got " + name + "[" + std::to_string(pos) + "] = " + std::to_string(off[pos]) +
                              " and " + name + "[" + std::to_string(pos + 1) + "] = " + std::to_string(off[pos + 1]));
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
