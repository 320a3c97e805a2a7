// Token log-probs and entropy (SPEC section 2) on the CPU, forward and fused backward.
//
// Naive PyTorch (log_softmax + gather, softmax * log_softmax, then autograd) makes several
// float32 N x V temporaries and passes over them four or more times. Here each masked-in row
// is read once in the forward, in chunks that stay in L1: the chunk is converted to float,
// its max taken, and the running (max, sum of exp, sum of exp * shifted logit) rescaled and
// accumulated (the online log-sum-exp). Only logp, entropy and lse are kept per row. The
// backward reads the row once more and writes dL/dz once, in the logits dtype, possibly into
// the logits buffer itself. Masked-out rows cost no pass over V in the forward and one write of
// zeros in the backward. Rows are split over threads; each row is done by one thread in a fixed
// order, so results do not depend on the thread count.
//
// Numerics: fp32 accumulation (fp64 for fp64 logits). The label is kept out of the running sum
// (s_other), so when p(label) is close to 1 logp = -log1p(s_other / e_label) and
// 1 - p(label) = -expm1(logp) keep their relative precision instead of cancelling.
#include "logprob.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// The hot loops are compiled for AVX-512, AVX2 and the baseline, and picked at load time.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define STEPPO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STEPPO_CLONES
#endif

namespace steppo {
namespace {

// Elements per chunk: 4 KiB of floats, so the converted chunk stays in L1 between the max
// and the accumulation.
constexpr int64_t kChunk = 1024;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// exp(x) for x <= ~88 in a form the compiler vectorises: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by the Cephes degree-6 polynomial (about 1 ulp), 2^n put into the exponent bits.
// Flushes results below the normal range (x < -87.33) to 0; propagates NaN.
inline float exp_f(float x) {
  const float kLo = -87.3365447f, kHi = 88.0f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  // Round to nearest by adding and removing 1.5 * 2^23 (SSE2-vectorisable, unlike floor).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  const float out = p * scale;
  return x < kLo ? 0.0f : out;
}

// ---------------------------------------------------------------- loads and stores
struct BF16 {
  uint16_t bits;
};
struct FP16 {
  uint16_t bits;
};

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Elem<double> {
  static double load(const double* p, int64_t i) { return p[i]; }
  static void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <>
struct Elem<BF16> {
  static float load(const BF16* p, int64_t i) { return bits_to_float(static_cast<uint32_t>(p[i].bits) << 16); }
  static void store(BF16* p, int64_t i, float v) {
    // Round to nearest even; NaN stays a quiet NaN.
    const uint32_t b = float_to_bits(v);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    p[i].bits = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
  }
};
template <>
struct Elem<FP16> {
  static float load(const FP16* p, int64_t i) { return fp16_to_float(p[i].bits); }
  static void store(FP16* p, int64_t i, float v) { p[i].bits = float_to_fp16(v); }
  // float -> IEEE half, round to nearest even, overflow to inf, NaN kept.
  static uint16_t float_to_fp16(float f) {
    const uint32_t b = float_to_bits(f);
    const uint32_t sign = (b >> 16) & 0x8000u;
    const uint32_t absb = b & 0x7fffffffu;
    if (absb > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (absb >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (absb < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or 0
      const float a = bits_to_float(absb);
      // a * 2^24 rounded to nearest even (the float add does the rounding).
      const float scaled = a * 16777216.0f;
      const uint32_t q = static_cast<uint32_t>(std::nearbyint(scaled));
      return static_cast<uint16_t>(sign | q);
    }
    const uint32_t mant_round = absb + 0xfffu + ((absb >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((mant_round - 0x38000000u) >> 13));
  }
};

template <typename T>
using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
inline void load_chunk(const T* z, int64_t n, Acc<T> inv_tau, Acc<T>* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = Elem<T>::load(z, i) * inv_tau;
}

template <typename T>
inline void store_chunk(const Acc<T>* buf, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::store(out, i, buf[i]);
}

template <typename T>
inline void store_zeros(T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::store(out, i, 0.0f);
}

// ---------------------------------------------------------------- vector helpers
STEPPO_CLONES float chunk_max(const float* buf, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

double chunk_max(const double* buf, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

// s += sum exp(u - shift); t += sum exp(u - shift) * (u - shift) (0 where exp underflows,
// so -inf logits add nothing).
STEPPO_CLONES void chunk_accumulate(const float* buf, int64_t n, float shift, bool with_entropy, float* s,
                                    float* t) {
  float ss = 0.0f, tt = 0.0f;
  if (with_entropy) {
#pragma omp simd reduction(+ : ss, tt)
    for (int64_t i = 0; i < n; ++i) {
      const float d = buf[i] - shift;
      const float e = exp_f(d);
      ss += e;
      tt += e > 0.0f ? e * d : 0.0f;
    }
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += exp_f(buf[i] - shift);
  }
  *s += ss;
  *t += tt;
}

void chunk_accumulate(const double* buf, int64_t n, double shift, bool with_entropy, double* s, double* t) {
  double ss = 0.0, tt = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = buf[i] - shift;
    const double e = std::exp(d);
    ss += e;
    if (with_entropy) tt += e > 0.0 ? e * d : 0.0;
  }
  *s += ss;
  *t += tt;
}

// buf[i] <- (-g_logp p_i - g_H p_i (log p_i + H)) / tau with log p_i = u_i - lse, in place. lse comes as
// lse_hi + lse_lo (the float64 lse split in two floats): u - lse_hi is exact where p is not tiny (Sterbenz),
// so log p keeps its precision instead of inheriting the rounding of lse to float (up to 2^-24 |lse|).
STEPPO_CLONES void chunk_grad(float* buf, int64_t n, float lse_hi, float lse_lo, float ent, float g_logp,
                              float g_ent, float inv_tau, bool with_entropy) {
  if (with_entropy) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float lp = (buf[i] - lse_hi) - lse_lo;
      const float p = exp_f(lp);
      const float term = p > 0.0f ? p * (lp + ent) : 0.0f;
      buf[i] = (-g_logp * p - g_ent * term) * inv_tau;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = -g_logp * exp_f((buf[i] - lse_hi) - lse_lo) * inv_tau;
  }
}

void chunk_grad(double* buf, int64_t n, double lse, double /*lse_lo*/, double ent, double g_logp, double g_ent,
                double inv_tau, bool with_entropy) {
  for (int64_t i = 0; i < n; ++i) {
    const double lp = buf[i] - lse;
    const double p = std::exp(lp);
    const double term = (with_entropy && p > 0.0) ? p * (lp + ent) : 0.0;
    buf[i] = (-g_logp * p - g_ent * term) * inv_tau;
  }
}

inline float exp_scalar(float x) { return std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

// ---------------------------------------------------------------- rows
template <typename T>
struct Rows {
  const T* base;
  int64_t rows_per_batch, stride_b, stride_t;
  const T* row(int64_t r) const { return base + (r / rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t; }
};

inline int64_t label_at(const void* labels, int dtype, int64_t r) {
  return dtype == kInt32 ? static_cast<int64_t>(static_cast<const int32_t*>(labels)[r])
                         : static_cast<const int64_t*>(labels)[r];
}

template <typename T>
void forward_rows(const T* logits, int64_t n, int64_t vocab, int64_t rpb, int64_t sb, int64_t st,
                  const void* labels, int labels_dtype, const bool* mask, double temperature, bool with_entropy,
                  Acc<T>* out_logp, Acc<T>* out_ent, double* out_lse) {
  using A = Acc<T>;
  const Rows<T> rows{logits, rpb, sb, st};
  const A inv_tau = static_cast<A>(1.0 / temperature);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const A nan = std::numeric_limits<A>::quiet_NaN();
#pragma omp parallel
  {
    std::vector<A> buf(static_cast<size_t>(std::min<int64_t>(kChunk, std::max<int64_t>(vocab, 1))));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < n; ++r) {
      if (!mask[r]) {
        out_logp[r] = 0;
        out_ent[r] = 0;
        out_lse[r] = 0;
        continue;
      }
      const T* z = rows.row(r);
      const int64_t y = label_at(labels, labels_dtype, r);
      const bool y_ok = y >= 0 && y < vocab;
      const A u_y = y_ok ? static_cast<A>(Elem<T>::load(z, y)) * inv_tau : nan;
      A m = neg_inf, s = 0, t = 0;
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t len = std::min(kChunk, vocab - c0);
        load_chunk(z + c0, len, inv_tau, buf.data());
        const A cm = chunk_max(buf.data(), len);
        if (cm > m) {
          if (s != 0 || t != 0) {  // m is finite here: rescale to the new shift
            const A alpha = exp_scalar(m - cm);
            t = alpha * (t + (m - cm) * s);
            s = alpha * s;
          }
          m = cm;
        }
        if (y_ok && y >= c0 && y < c0 + len) buf[y - c0] = neg_inf;  // the label is added below
        const A shift = m == neg_inf ? A(0) : m;
        chunk_accumulate(buf.data(), len, shift, with_entropy, &s, &t);
      }
      // u_y <= m, so the label's max was already taken into the shift. An all -inf row gives NaN, like
      // log_softmax.
      const A shift = m == neg_inf ? A(0) : m;
      const A d_y = u_y - shift;
      const A e_y = exp_scalar(d_y);
      const A s_all = s + e_y;
      const A log_s = std::log(s_all);
      out_lse[r] = static_cast<double>(shift) + static_cast<double>(log_s);  // exact: kept in float64
      out_logp[r] = e_y >= s ? -std::log1p(s / e_y) : d_y - log_s;
      if (with_entropy) {
        const A t_all = t + (e_y > 0 ? e_y * d_y : A(0));
        out_ent[r] = log_s - t_all / s_all;
      } else {
        out_ent[r] = 0;
      }
    }
  }
}

template <typename T>
void backward_rows(const T* logits, int64_t n, int64_t vocab, int64_t rpb, int64_t sb, int64_t st,
                   const void* labels, int labels_dtype, const bool* mask, const Acc<T>* logp, const Acc<T>* ent,
                   const double* lse, const Acc<T>* g_logp, const Acc<T>* g_ent, double temperature,
                   bool with_entropy, T* grad, int64_t gsb, int64_t gst) {
  using A = Acc<T>;
  const Rows<T> rows{logits, rpb, sb, st};
  const A inv_tau = static_cast<A>(1.0 / temperature);
#pragma omp parallel
  {
    std::vector<A> buf(static_cast<size_t>(std::min<int64_t>(kChunk, std::max<int64_t>(vocab, 1))));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < n; ++r) {
      T* g = grad + (r / rpb) * gsb + (r % rpb) * gst;
      if (!mask[r]) {
        store_zeros(g, vocab);
        continue;
      }
      const T* z = rows.row(r);
      const A gl = g_logp[r];
      const A gh = with_entropy ? g_ent[r] : A(0);
      const A h = with_entropy ? ent[r] : A(0);
      const A lse_hi = static_cast<A>(lse[r]);
      const A lse_lo = static_cast<A>(lse[r] - static_cast<double>(lse_hi));
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t len = std::min(kChunk, vocab - c0);
        load_chunk(z + c0, len, inv_tau, buf.data());
        chunk_grad(buf.data(), len, lse_hi, lse_lo, h, gl, gh, inv_tau, with_entropy);
        store_chunk(buf.data(), len, g + c0);
      }
      // The label's entry from the saved logp: 1 - p = -expm1(logp) keeps its precision near p = 1.
      const int64_t y = label_at(labels, labels_dtype, r);
      if (y >= 0 && y < vocab) {
        const A lp = logp[r];
        const A p = exp_scalar(lp);
        const A term = (with_entropy && p > 0) ? p * (lp + h) : A(0);
        Elem<T>::store(g, y, (gl * -std::expm1(lp) - gh * term) * inv_tau);
      }
    }
  }
}

template <typename F>
void dispatch_float(int code, F&& f) {
  switch (code) {
    case kFloat32: f(static_cast<float*>(nullptr)); break;
    case kFloat64: f(static_cast<double*>(nullptr)); break;
    case kBFloat16: f(static_cast<BF16*>(nullptr)); break;
    case kFloat16: f(static_cast<FP16*>(nullptr)); break;
    default: bad_dtype("logits", code);
  }
}

void check_common(int64_t n, int64_t vocab, int64_t rpb, double temperature, int labels_dtype) {
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  if (vocab < 1) throw std::invalid_argument("vocab must be >= 1");
  if (rpb < 1) throw std::invalid_argument("rows_per_batch must be >= 1");
  if (!(temperature > 0)) throw std::invalid_argument("temperature must be > 0");
  if (labels_dtype != kInt32 && labels_dtype != kInt64) bad_dtype("labels", labels_dtype);
}

}  // namespace

void token_logprobs_cpu(uintptr_t logits, int logits_dtype, int64_t n, int64_t vocab, int64_t rows_per_batch,
                        int64_t stride_b, int64_t stride_t, uintptr_t labels, int labels_dtype, uintptr_t mask,
                        double temperature, bool with_entropy, uintptr_t logp, uintptr_t entropy, uintptr_t lse) {
  check_common(n, vocab, rows_per_batch, temperature, labels_dtype);
  dispatch_float(logits_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = Acc<T>;
    forward_rows<T>(reinterpret_cast<const T*>(logits), n, vocab, rows_per_batch, stride_b, stride_t,
                    reinterpret_cast<const void*>(labels), labels_dtype, reinterpret_cast<const bool*>(mask),
                    temperature, with_entropy, reinterpret_cast<A*>(logp), reinterpret_cast<A*>(entropy),
                    reinterpret_cast<double*>(lse));
  });
}

void token_logprobs_backward_cpu(uintptr_t logits, int logits_dtype, int64_t n, int64_t vocab,
                                 int64_t rows_per_batch, int64_t stride_b, int64_t stride_t, uintptr_t labels,
                                 int labels_dtype, uintptr_t mask, uintptr_t logp, uintptr_t entropy, uintptr_t lse,
                                 uintptr_t grad_logp, uintptr_t grad_entropy, double temperature, bool with_entropy,
                                 uintptr_t grad, int64_t grad_stride_b, int64_t grad_stride_t) {
  check_common(n, vocab, rows_per_batch, temperature, labels_dtype);
  dispatch_float(logits_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = Acc<T>;
    if (grad != logits && grad_stride_t == vocab && (grad_stride_b == 0 || grad_stride_b == rows_per_batch * vocab))
      advise_huge_pages(reinterpret_cast<void*>(grad), static_cast<size_t>(n) * vocab * sizeof(T));
    backward_rows<T>(reinterpret_cast<const T*>(logits), n, vocab, rows_per_batch, stride_b, stride_t,
                     reinterpret_cast<const void*>(labels), labels_dtype, reinterpret_cast<const bool*>(mask),
                     reinterpret_cast<const A*>(logp), reinterpret_cast<const A*>(entropy),
                     reinterpret_cast<const double*>(lse), reinterpret_cast<const A*>(grad_logp),
                     reinterpret_cast<const A*>(grad_entropy), temperature, with_entropy, reinterpret_cast<T*>(grad),
                     grad_stride_b, grad_stride_t);
  });
}

}  // namespace steppo
