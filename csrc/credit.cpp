// Credit assignment on the CPU (SPEC sections 4-6): token broadcast, step GAE, token GAE,
// whitening and group normalisation (GRPO, RLOO, GiGPO step groups).
//
// The published implementations loop over rows in Python (np.unique and dictionaries for
// the groups, a Python loop over tokens for GAE). Here every recurrence runs per trajectory
// and every group statistic per group, in parallel, in double precision, in a fixed order:
// results do not depend on the thread count.
#include "credit.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace steppo {
namespace {

// Element access with the dtype fixed at compile time: the kernels below are instantiated per
// (input, output) dtype through with_in / with_out, so their loops carry no per-element dtype
// switch and the compiler can vectorise them.
template <int Code>
struct In;
template <>
struct In<kFloat32> {
  static double at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
template <>
struct In<kFloat64> {
  static double at(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
};
template <>
struct In<kBFloat16> {
  static double at(const void* p, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); }
};
template <>
struct In<kFloat16> {
  static double at(const void* p, int64_t i) { return fp16_to_float(static_cast<const uint16_t*>(p)[i]); }
};

template <int Code>
struct Out;
template <>
struct Out<kFloat32> {
  static void set(void* p, int64_t i, double v) { static_cast<float*>(p)[i] = static_cast<float>(v); }
};
template <>
struct Out<kFloat64> {
  static void set(void* p, int64_t i, double v) { static_cast<double*>(p)[i] = v; }
};

// Calls f(In<code>{}) for a float input dtype code; raises naming `name` for any other.
template <typename F>
void with_in(const char* name, int code, F&& f) {
  switch (code) {
    case kFloat32: f(In<kFloat32>{}); break;
    case kFloat64: f(In<kFloat64>{}); break;
    case kBFloat16: f(In<kBFloat16>{}); break;
    case kFloat16: f(In<kFloat16>{}); break;
    default: bad_dtype(name, code);
  }
}

void advise_out(void* p, int64_t n, int out_dtype) {
  advise_huge_pages(p, static_cast<size_t>(n) * (out_dtype == kFloat64 ? 8 : 4));
}

// Calls f(Out<code>{}) for float32 / float64 outputs.
template <typename F>
void with_out(int code, F&& f) {
  switch (code) {
    case kFloat32: f(Out<kFloat32>{}); break;
    case kFloat64: f(Out<kFloat64>{}); break;
    default: bad_dtype("out", code);
  }
}

// The GAE recurrence, backwards over positions begin..end-1 of one trajectory; element idx(i) holds
// position i's reward and value. delta = r + gamma V_next - V (V past the end = 0);
// A = delta + gamma lam A_next; R = A + V. With Checked, elements outside [0, size) are never
// touched: the sweep stops at the first one and returns its position (else -1). Without it the
// caller has checked the range already (step GAE: begin..end within the steps).
template <bool Checked, typename R, typename V, typename O, typename Index>
int64_t gae_sweep(int64_t begin, int64_t end, Index idx, int64_t size, const void* r, const void* v, double gamma,
                  double lam, void* adv, void* ret) {
  double next_v = 0.0, next_a = 0.0;
  for (int64_t i = end - 1; i >= begin; --i) {
    const int64_t e = idx(i);
    if (Checked && !in_range(e, size)) return i;
    const double ve = V::at(v, e);
    const double ae = R::at(r, e) + gamma * next_v - ve + gamma * lam * next_a;
    O::set(adv, e, ae);
    O::set(ret, e, ae + ve);
    next_v = ve;
    next_a = ae;
  }
  return -1;
}

// Runs body(I{}, O{}) with the input and output dtypes fixed.
template <typename F>
void with_in_out(const char* name, int in_dtype, int out_dtype, F&& body) {
  with_in(name, in_dtype, [&](auto it) { with_out(out_dtype, [&](auto ot) { body(it, ot); }); });
}

// Runs body(R{}, V{}, O{}) with the three dtypes fixed.
template <typename F>
void with_gae_types(const char* r_name, int r_dtype, const char* v_name, int v_dtype, int out_dtype, F&& body) {
  with_in(r_name, r_dtype, [&](auto rt) {
    with_in_out(v_name, v_dtype, out_dtype, [&](auto vt, auto ot) { body(rt, vt, ot); });
  });
}

// Elements per block of the whitening sums: the sum of each block is formed in order, then the
// block sums in order, whatever the number of threads.
constexpr int64_t kBlock = 4096;

}  // namespace

void broadcast_to_tokens_cpu(uintptr_t step_values, int values_dtype, int64_t num_values, uintptr_t token_step,
                             int64_t n, uintptr_t out, int out_dtype) {
  const void* v = reinterpret_cast<const void*>(step_values);
  const int32_t* ts = reinterpret_cast<const int32_t*>(token_step);
  void* o = reinterpret_cast<void*>(out);
  advise_out(o, n, out_dtype);
  // One predictable branch per token (cheaper than a select or a clamp, which stop the compiler's
  // scalar loop from hiding the gather latency): an id >= num_values is skipped and reported after.
  int64_t first_bad = n;
  with_in_out("step_values", values_dtype, out_dtype, [&](auto it, auto ot) {
    using I = decltype(it);
    using O = decltype(ot);
#pragma omp parallel for schedule(static) reduction(min : first_bad)
    for (int64_t t = 0; t < n; ++t) {
      const int32_t s = ts[t];
      if (s >= num_values) {
        first_bad = std::min(first_bad, t);
        O::set(o, t, 0.0);
        continue;
      }
      O::set(o, t, s >= 0 ? I::at(v, s) : 0.0);
    }
  });
  if (first_bad < n)
    bad_index("token_step", first_bad, ts[first_bad],
              "is not below the number of step values (" + std::to_string(num_values) + ")");
}

void step_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t num_steps,
                  uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                  uintptr_t ret, int out_dtype) {
  const void* r = reinterpret_cast<const void*>(rewards);
  const void* v = reinterpret_cast<const void*>(values);
  const int64_t* off = reinterpret_cast<const int64_t*>(traj_step_offsets);
  void* a = reinterpret_cast<void*>(adv);
  void* R = reinterpret_cast<void*>(ret);
  check_csr_ends("traj_step_offsets", off, num_trajectories, num_steps, "steps");
  int64_t bad_traj = num_trajectories;
  with_gae_types("step_rewards", rewards_dtype, "step_values", values_dtype, out_dtype, [&](auto rt, auto vt, auto ot) {
    using RT = decltype(rt);
    using VT = decltype(vt);
    using OT = decltype(ot);
#pragma omp parallel for schedule(dynamic, 64) reduction(min : bad_traj)
    for (int64_t j = 0; j < num_trajectories; ++j) {
      if (!pair_ok(off[j], off[j + 1], num_steps)) {
        bad_traj = std::min(bad_traj, j);
        continue;
      }
      gae_sweep<false, RT, VT, OT>(off[j], off[j + 1], [](int64_t i) { return i; }, num_steps, r, v, gamma, lam, a,
                                   R);
    }
  });
  if (bad_traj < num_trajectories) bad_pair("traj_step_offsets", bad_traj, off, num_steps);
}

void token_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                   uintptr_t step_tokens, int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps,
                   uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                   uintptr_t ret, int out_dtype) {
  const void* r = reinterpret_cast<const void*>(rewards);
  const void* v = reinterpret_cast<const void*>(values);
  const int64_t* tok = reinterpret_cast<const int64_t*>(step_tokens);
  const int64_t* soff = reinterpret_cast<const int64_t*>(step_token_offsets);
  const int64_t* toff = reinterpret_cast<const int64_t*>(traj_step_offsets);
  void* a = reinterpret_cast<void*>(adv);
  void* R = reinterpret_cast<void*>(ret);
  check_csr_ends("traj_step_offsets", toff, num_trajectories, num_steps, "steps");
  check_csr_ends("step_token_offsets", soff, num_steps, n_step_tokens, "step tokens");
  advise_out(a, n_tokens, out_dtype);
  advise_out(R, n_tokens, out_dtype);
  // First bad trajectory pair, step pair and step_tokens position (each checked where it is read).
  int64_t bad_traj = num_trajectories, bad_step = num_steps, bad_tok = n_step_tokens;
  with_gae_types("token_rewards", rewards_dtype, "token_values", values_dtype, out_dtype,
                 [&](auto rt, auto vt, auto ot) {
    using RT = decltype(rt);
    using VT = decltype(vt);
    using OT = decltype(ot);
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < n_tokens; ++t) {
        OT::set(a, t, 0.0);
        OT::set(R, t, 0.0);
      }
      // The implicit barrier above orders the zeros before the trajectories' writes.
#pragma omp for schedule(dynamic, 64) reduction(min : bad_traj, bad_step, bad_tok)
      for (int64_t j = 0; j < num_trajectories; ++j) {
        if (!pair_ok(toff[j], toff[j + 1], num_steps)) {
          bad_traj = std::min(bad_traj, j);
          continue;
        }
        // With every step pair of the trajectory in order, its tokens are one contiguous range of
        // step_tokens that no other trajectory's range overlaps.
        bool steps_ok = true;
        for (int64_t k = toff[j]; k < toff[j + 1]; ++k) {
          if (!pair_ok(soff[k], soff[k + 1], n_step_tokens)) {
            bad_step = std::min(bad_step, k);
            steps_ok = false;
            break;
          }
        }
        if (!steps_ok) continue;
        const int64_t i = gae_sweep<true, RT, VT, OT>(soff[toff[j]], soff[toff[j + 1]],
                                                      [tok](int64_t i) { return tok[i]; }, n_tokens, r, v, gamma,
                                                      lam, a, R);
        if (i >= 0) bad_tok = std::min(bad_tok, i);
      }
    }
  });
  if (bad_traj < num_trajectories) bad_pair("traj_step_offsets", bad_traj, toff, num_steps);
  if (bad_step < num_steps) bad_pair("step_token_offsets", bad_step, soff, n_step_tokens);
  if (bad_tok < n_step_tokens)
    bad_index("step_tokens", bad_tok, tok[bad_tok],
              "is outside [0, " + std::to_string(n_tokens) + "), the token rewards' range");
}

void whiten_moments_cpu(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t out) {
  const void* xp = reinterpret_cast<const void*>(x);
  const bool* m = reinterpret_cast<const bool*>(mask);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> cnt(static_cast<size_t>(nb)), sum(static_cast<size_t>(nb)), sq(static_cast<size_t>(nb));
  with_in("x", x_dtype, [&](auto in) {
    using I = decltype(in);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      double c = 0.0, s = 0.0, q = 0.0;
      const int64_t end = std::min(n, (b + 1) * kBlock);
      for (int64_t i = b * kBlock; i < end; ++i) {
        // Load unconditionally and select (no branch to mispredict); a select, not a multiply by
        // the mask, so a NaN under the mask stays out.
        const bool keep = m == nullptr || reinterpret_cast<const uint8_t*>(m)[i] != 0;
        const double raw = I::at(xp, i);
        const double xi = keep ? raw : 0.0;
        c += keep ? 1.0 : 0.0;
        s += xi;
        q += xi * xi;
      }
      cnt[b] = c;
      sum[b] = s;
      sq[b] = q;
    }
  });
  double* o = reinterpret_cast<double*>(out);
  o[0] = o[1] = o[2] = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    o[0] += cnt[b];
    o[1] += sum[b];
    o[2] += sq[b];
  }
}

void whiten_apply_cpu(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t moments, int mode, double eps,
                      uintptr_t out, int out_dtype) {
  if (mode != 0 && mode != 1) throw std::invalid_argument("mode must be 0 (step) or 1 (token)");
  const double* mo = reinterpret_cast<const double*>(moments);
  const double cnt = mo[0], s = mo[1], ss = mo[2];
  const double mean = s / std::max(cnt, 1.0);
  double var = cnt >= 2 ? (ss - s * mean) / (cnt - 1.0) : 0.0;
  var = std::max(var, 0.0);
  const double scale = mode == 0 ? 1.0 / (std::sqrt(var) + eps) : 1.0 / std::sqrt(var + eps);
  const void* xp = reinterpret_cast<const void*>(x);
  const bool* m = reinterpret_cast<const bool*>(mask);
  void* o = reinterpret_cast<void*>(out);
  advise_out(o, n, out_dtype);
  with_in_out("x", x_dtype, out_dtype, [&](auto it, auto ot) {
    using I = decltype(it);
    using O = decltype(ot);
    if (m == nullptr) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) O::set(o, i, (I::at(xp, i) - mean) * scale);
    } else {
      const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const double y = (I::at(xp, i) - mean) * scale;  // computed for every element, then selected
        O::set(o, i, mb[i] != 0 ? y : 0.0);
      }
    }
  });
}

void group_advantage_cpu(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                         int norm, int singleton, double eps, uintptr_t out, int out_dtype) {
  if (norm < 0 || norm > 2) throw std::invalid_argument("norm must be 0 (mean_std), 1 (mean) or 2 (rloo)");
  if (singleton != 0 && singleton != 1) throw std::invalid_argument("singleton must be 0 (unit) or 1 (zero)");
  const void* v = reinterpret_cast<const void*>(values);
  const int64_t* g = reinterpret_cast<const int64_t*>(group);
  const int64_t* k = reinterpret_cast<const int64_t*>(subkey);
  void* o = reinterpret_cast<void*>(out);
  // Members of each group, contiguous: a stable sort of the indices by (group, subkey).
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (g[a] != g[b]) return g[a] < g[b];
    return k != nullptr && k[a] < k[b];
  });
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = order[i];
    if (i == 0 || g[a] != g[order[i - 1]] || (k != nullptr && k[a] != k[order[i - 1]])) starts.push_back(i);
  }
  starts.push_back(n);
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;
  with_in_out("values", values_dtype, out_dtype, [&](auto it, auto ot) {
    using I = decltype(it);
    using O = decltype(ot);
#pragma omp parallel for schedule(dynamic, 256)
    for (int64_t q = 0; q < num_groups; ++q) {
      const int64_t b = starts[q], e = starts[q + 1];
      const double cnt = static_cast<double>(e - b);
      if (e - b == 1) {
        const double x = I::at(v, order[b]);
        O::set(o, order[b], singleton == 1 ? 0.0 : (norm == 0 ? x / (1.0 + eps) : x));
        continue;
      }
      double sum = 0.0;
      for (int64_t i = b; i < e; ++i) sum += I::at(v, order[i]);
      const double mean = sum / cnt;
      double inv_std = 1.0;
      if (norm == 0) {
        double dev2 = 0.0;
        for (int64_t i = b; i < e; ++i) {
          const double d = I::at(v, order[i]) - mean;
          dev2 += d * d;
        }
        inv_std = 1.0 / (std::sqrt(dev2 / (cnt - 1.0)) + eps);
      }
      for (int64_t i = b; i < e; ++i) {
        const double d = I::at(v, order[i]) - mean;
        O::set(o, order[i], norm == 0 ? d * inv_std : (norm == 1 ? d : cnt * d / (cnt - 1.0)));
      }
    }
  });
}

}  // namespace steppo
