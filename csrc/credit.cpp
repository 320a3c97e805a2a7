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

inline double load(const void* p, int code, int64_t i) { return load_as_double(p, code, i); }

inline void store(void* p, int code, int64_t i, double v) {
  if (code == kFloat32) {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  } else if (code == kFloat64) {
    static_cast<double*>(p)[i] = v;
  } else {
    bad_dtype("out", code);
  }
}

void check_out(int code) {
  if (code != kFloat32 && code != kFloat64) bad_dtype("out", code);
}

void check_in(const char* name, int code) {
  if (code != kFloat32 && code != kFloat64 && code != kBFloat16 && code != kFloat16) bad_dtype(name, code);
}

// The GAE recurrence, backwards over positions begin..end-1 of one trajectory; element idx(i) holds
// position i's reward and value. delta = r + gamma V_next - V (V past the end = 0);
// A = delta + gamma lam A_next; R = A + V.
template <typename Index>
void gae_sweep(int64_t begin, int64_t end, Index idx, const void* r, int r_dtype, const void* v, int v_dtype,
               double gamma, double lam, void* adv, void* ret, int out_dtype) {
  double next_v = 0.0, next_a = 0.0;
  for (int64_t i = end - 1; i >= begin; --i) {
    const int64_t e = idx(i);
    const double ve = load(v, v_dtype, e);
    const double ae = load(r, r_dtype, e) + gamma * next_v - ve + gamma * lam * next_a;
    store(adv, out_dtype, e, ae);
    store(ret, out_dtype, e, ae + ve);
    next_v = ve;
    next_a = ae;
  }
}

// Elements per block of the whitening sums: the sum of each block is formed in order, then the
// block sums in order, whatever the number of threads.
constexpr int64_t kBlock = 4096;

}  // namespace

void broadcast_to_tokens_cpu(uintptr_t step_values, int values_dtype, uintptr_t token_step, int64_t n,
                             uintptr_t out, int out_dtype) {
  check_in("step_values", values_dtype);
  check_out(out_dtype);
  const void* v = reinterpret_cast<const void*>(step_values);
  const int32_t* ts = reinterpret_cast<const int32_t*>(token_step);
  void* o = reinterpret_cast<void*>(out);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) store(o, out_dtype, t, ts[t] >= 0 ? load(v, values_dtype, ts[t]) : 0.0);
}

void step_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype,
                  uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                  uintptr_t ret, int out_dtype) {
  check_in("step_rewards", rewards_dtype);
  check_in("step_values", values_dtype);
  check_out(out_dtype);
  const void* r = reinterpret_cast<const void*>(rewards);
  const void* v = reinterpret_cast<const void*>(values);
  const int64_t* off = reinterpret_cast<const int64_t*>(traj_step_offsets);
  void* a = reinterpret_cast<void*>(adv);
  void* R = reinterpret_cast<void*>(ret);
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t j = 0; j < num_trajectories; ++j)
    gae_sweep(off[j], off[j + 1], [](int64_t i) { return i; }, r, rewards_dtype, v, values_dtype, gamma, lam, a, R,
              out_dtype);
}

void token_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                   uintptr_t step_tokens, uintptr_t step_token_offsets, uintptr_t traj_step_offsets,
                   int64_t num_trajectories, double gamma, double lam, uintptr_t adv, uintptr_t ret, int out_dtype) {
  check_in("token_rewards", rewards_dtype);
  check_in("token_values", values_dtype);
  check_out(out_dtype);
  const void* r = reinterpret_cast<const void*>(rewards);
  const void* v = reinterpret_cast<const void*>(values);
  const int64_t* tok = reinterpret_cast<const int64_t*>(step_tokens);
  const int64_t* soff = reinterpret_cast<const int64_t*>(step_token_offsets);
  const int64_t* toff = reinterpret_cast<const int64_t*>(traj_step_offsets);
  void* a = reinterpret_cast<void*>(adv);
  void* R = reinterpret_cast<void*>(ret);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tokens; ++t) {
      store(a, out_dtype, t, 0.0);
      store(R, out_dtype, t, 0.0);
    }
    // The implicit barrier above orders the zeros before the trajectories' writes.
#pragma omp for schedule(dynamic, 64)
    for (int64_t j = 0; j < num_trajectories; ++j) {
      // The trajectory's agent tokens in time order are one contiguous range of step_tokens.
      const int64_t begin = soff[toff[j]], end = soff[toff[j + 1]];
      gae_sweep(begin, end, [tok](int64_t i) { return tok[i]; }, r, rewards_dtype, v, values_dtype, gamma, lam, a,
                R, out_dtype);
    }
  }
}

void whiten_moments_cpu(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t out) {
  check_in("x", x_dtype);
  const void* xp = reinterpret_cast<const void*>(x);
  const bool* m = reinterpret_cast<const bool*>(mask);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> cnt(static_cast<size_t>(nb)), sum(static_cast<size_t>(nb)), sq(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    double c = 0.0, s = 0.0, q = 0.0;
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) {
      if (m != nullptr && !m[i]) continue;
      const double xi = load(xp, x_dtype, i);
      c += 1.0;
      s += xi;
      q += xi * xi;
    }
    cnt[b] = c;
    sum[b] = s;
    sq[b] = q;
  }
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
  check_in("x", x_dtype);
  check_out(out_dtype);
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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = m == nullptr || m[i];
    store(o, out_dtype, i, keep ? (load(xp, x_dtype, i) - mean) * scale : 0.0);
  }
}

void group_advantage_cpu(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                         int norm, int singleton, double eps, uintptr_t out, int out_dtype) {
  check_in("values", values_dtype);
  check_out(out_dtype);
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
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t q = 0; q < num_groups; ++q) {
    const int64_t b = starts[q], e = starts[q + 1];
    const double cnt = static_cast<double>(e - b);
    if (e - b == 1) {
      const double x = load(v, values_dtype, order[b]);
      const double single = singleton == 1 ? 0.0 : (norm == 0 ? x / (1.0 + eps) : x);
      store(o, out_dtype, order[b], single);
      continue;
    }
    double sum = 0.0;
    for (int64_t i = b; i < e; ++i) sum += load(v, values_dtype, order[i]);
    const double mean = sum / cnt;
    double inv_std = 1.0;
    if (norm == 0) {
      double dev2 = 0.0;
      for (int64_t i = b; i < e; ++i) {
        const double d = load(v, values_dtype, order[i]) - mean;
        dev2 += d * d;
      }
      inv_std = 1.0 / (std::sqrt(dev2 / (cnt - 1.0)) + eps);
    }
    for (int64_t i = b; i < e; ++i) {
      const double d = load(v, values_dtype, order[i]) - mean;
      const double res = norm == 0 ? d * inv_std : (norm == 1 ? d : cnt * d / (cnt - 1.0));
      store(o, out_dtype, order[i], res);
    }
  }
}

}  // namespace steppo
