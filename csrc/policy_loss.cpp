// The clipped policy loss (SPEC section 7) on the CPU: value, metrics and closed-form gradients.
//
// The reference composes some twenty tensor ops (masks, per-step sums by index_add, broadcasts,
// clamps, where's, then the same again for the gradient), each a pass over N tokens with its own
// temporary. Here pass 1 gathers the per-step token counts and log-ratio sums, and pass 2 computes
// each token's ratio, surrogate, aggregation weight, loss contribution and gradient at once. All sums
// are float64 and run in token order, so the result is the same for any thread count.
#include "policy_loss.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace steppo {
namespace {

enum Agg : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3, kSeqMeanTokenSumNorm = 4 };
enum Kl : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

// max, min and clamp that return NaN when an argument is NaN, as torch.maximum / minimum / clamp do
// (std::max and std::min return their first argument when a comparison with NaN fails).
inline double nan_max(double a, double b) { return std::isnan(a) || std::isnan(b) ? a + b : (a < b ? b : a); }
inline double nan_min(double a, double b) { return std::isnan(a) || std::isnan(b) ? a + b : (b < a ? b : a); }
inline double nan_clamp(double x, double lo, double hi) { return nan_min(nan_max(x, lo), hi); }

template <typename T, typename I>
void run(const T* lp, const T* old, const T* adv, const I* ts, int64_t n, int64_t num_steps, const T* w, const T* ent,
         const T* ref, bool step_level, double clip_low, double clip_high, double dual_clip, int agg,
         double entropy_coef, double kl_coef, int kl_type, double gnt, double gns, double norm, double* loss_out,
         double* metrics, T* g_lp, T* g_ent) {
  const bool has_dual = !std::isnan(dual_clip);
  // Pass 1: agent tokens per step and each step's sum of log-ratios.
  std::vector<double> n_s(static_cast<size_t>(num_steps), 0.0);
  std::vector<double> diff_s(step_level ? static_cast<size_t>(num_steps) : 0, 0.0);
  int64_t n_tok = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = static_cast<int64_t>(ts[t]);
    if (s < 0) continue;
    if (s >= num_steps)
      bad_index("token_step", t, s, "is not below num_steps (" + std::to_string(num_steps) + ")");
    ++n_tok;
    n_s[s] += 1.0;
    if (step_level) diff_s[s] += static_cast<double>(lp[t]) - static_cast<double>(old[t]);
  }
  int64_t s_prime = 0;
  for (int64_t s = 0; s < num_steps; ++s) s_prime += n_s[s] > 0 ? 1 : 0;
  // The aggregation weight c_t of an agent token (SPEC 7's table, local or global counts).
  const double tok_div = std::max(std::isnan(gnt) ? static_cast<double>(n_tok) : gnt, 1.0);
  const double step_div = std::max(std::isnan(gns) ? static_cast<double>(s_prime) : gns, 1.0);
  auto weight_of = [&](int64_t s) -> double {
    switch (agg) {
      case kTokenSum: return 1.0;
      case kTokenMean: return 1.0 / tok_div;
      case kSeqMeanTokenMean: return 1.0 / step_div / (n_s[s] + 1e-8);
      case kSeqMeanTokenSum: return 1.0 / step_div;
      default: return 1.0 / step_div / norm;
    }
  };
  // Pass 2: every token at once.
  double pg = 0, ent_term = 0, kl_term = 0;
  double clipped = 0, lower = 0, neg_kl = 0, r_sum = 0, ent_sum = 0, kl_sum = 0;
  double r_min = std::numeric_limits<double>::infinity(), r_max = -r_min;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = static_cast<int64_t>(ts[t]);
    if (s < 0) {
      g_lp[t] = T(0);
      if (g_ent) g_ent[t] = T(0);
      continue;
    }
    const double x = lp[t], a = adv[t];
    const double diff = x - static_cast<double>(old[t]);
    // d ratio / d logp is the ratio inside the clamp, ratio * 0 outside: a NaN ratio stays NaN there,
    // as in the reference.
    double ratio, dratio;
    if (step_level) {
      const double l = diff_s[s] / std::max(n_s[s], 1.0);
      ratio = std::exp(nan_min(l, 10.0));
      dratio = ratio * (l <= 10.0 ? 1.0 : 0.0);
    } else {
      ratio = std::exp(nan_clamp(diff, -20.0, 20.0));
      dratio = ratio * ((diff >= -20.0 && diff <= 20.0) ? 1.0 : 0.0);
    }
    const double pg1 = -a * ratio;
    const double pg2 = -a * nan_clamp(ratio, 1.0 - clip_low, 1.0 + clip_high);
    double l_tok = nan_max(pg1, pg2);
    const bool is_clipped = pg2 > pg1;
    double dl = is_clipped ? 0.0 : -a;
    if (has_dual && a < 0) {
      const double pg3 = -a * dual_clip;
      if (l_tok > pg3) lower += 1.0;
      dl *= l_tok < pg3 ? 1.0 : (l_tok == pg3 ? 0.5 : 0.0);  // d min(L, pg3) / dL, ties split
      l_tok = nan_min(l_tok, pg3);
    }
    if (w) {
      l_tok *= static_cast<double>(w[t]);
      dl *= static_cast<double>(w[t]);
    }
    const double c = weight_of(s);
    pg += c * l_tok;
    double g = c * dl * dratio;
    if (ref) {
      const double r = ref[t];
      const double d = x - r;
      double kl, dkl;
      switch (kl_type) {
        case kK1: kl = d; dkl = 1.0; break;
        case kAbs: kl = std::fabs(d); dkl = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0); break;
        case kK2: kl = 0.5 * d * d; dkl = d; break;
        default: {
          const double xr = r - x;
          const double xc = nan_clamp(xr, -20.0, 20.0);
          const double raw = std::exp(xc) - xc - 1.0;
          kl = nan_clamp(raw, -10.0, 10.0);
          const bool inside = xr >= -20.0 && xr <= 20.0 && raw >= -10.0 && raw <= 10.0;
          dkl = -(std::exp(xc) - 1.0) * (inside ? 1.0 : 0.0);
        }
      }
      kl_sum += kl;
      if (kl_coef != 0.0) {
        kl_term += c * kl;
        g += kl_coef * c * dkl;
      }
    }
    if (ent) {
      const double h = ent[t];
      ent_sum += h;
      ent_term += c * h;
      g_ent[t] = static_cast<T>(-entropy_coef * c);
    }
    g_lp[t] = static_cast<T>(g);
    clipped += is_clipped ? 1.0 : 0.0;
    neg_kl -= diff;
    r_sum += ratio;
    r_min = nan_min(r_min, ratio);  // a NaN ratio makes both NaN, as torch's min / max do
    r_max = nan_max(r_max, ratio);
  }
  double loss = pg;
  if (ent && entropy_coef != 0.0) loss -= entropy_coef * ent_term;
  if (ref && kl_coef != 0.0) loss += kl_coef * kl_term;
  const double cnt = std::max(static_cast<double>(n_tok), 1.0);
  *loss_out = loss;
  metrics[0] = pg;
  metrics[1] = clipped / cnt;
  metrics[2] = lower / cnt;
  metrics[3] = neg_kl / cnt;
  metrics[4] = r_sum / cnt;
  metrics[5] = n_tok ? r_min : 0.0;
  metrics[6] = n_tok ? r_max : 0.0;
  metrics[7] = ent ? ent_sum / cnt : 0.0;
  metrics[8] = ref ? kl_sum / cnt : 0.0;
}

template <typename T>
void with_steps(int step_dtype, uintptr_t ts, const T* lp, const T* old, const T* adv, int64_t n,
                int64_t num_steps, const T* w, const T* ent, const T* ref, bool step_level, double clip_low,
                double clip_high, double dual_clip, int agg, double entropy_coef, double kl_coef, int kl_type,
                double gnt, double gns, double norm, double* loss, double* metrics, T* g_lp, T* g_ent) {
  if (step_dtype == kInt32) {
    run(lp, old, adv, reinterpret_cast<const int32_t*>(ts), n, num_steps, w, ent, ref, step_level, clip_low,
        clip_high, dual_clip, agg, entropy_coef, kl_coef, kl_type, gnt, gns, norm, loss, metrics, g_lp, g_ent);
  } else if (step_dtype == kInt64) {
    run(lp, old, adv, reinterpret_cast<const int64_t*>(ts), n, num_steps, w, ent, ref, step_level, clip_low,
        clip_high, dual_clip, agg, entropy_coef, kl_coef, kl_type, gnt, gns, norm, loss, metrics, g_lp, g_ent);
  } else {
    bad_dtype("token_step", step_dtype);
  }
}

}  // namespace

void policy_loss_cpu(uintptr_t logp, uintptr_t old_logp, uintptr_t advantages, int float_dtype, uintptr_t token_step,
                     int step_dtype, int64_t n, int64_t num_steps, uintptr_t weights, uintptr_t entropy,
                     uintptr_t ref_logp, int ratio_level, double clip_low, double clip_high, double dual_clip,
                     int agg_mode, double entropy_coef, double kl_coef, int kl_type, double global_num_tokens,
                     double global_num_steps, double norm_constant, uintptr_t loss, uintptr_t metrics,
                     uintptr_t grad_logp, uintptr_t grad_entropy) {
  if (n < 0 || num_steps < 0) throw std::invalid_argument("n and num_steps must be >= 0");
  if (ratio_level != 0 && ratio_level != 1) throw std::invalid_argument("ratio_level must be 0 (token) or 1 (step)");
  if (agg_mode < 0 || agg_mode > 4) throw std::invalid_argument("agg_mode must be in 0..4");
  if (kl_type < 0 || kl_type > 3) throw std::invalid_argument("kl_type must be in 0..3");
  if (agg_mode == kSeqMeanTokenSumNorm && !(norm_constant > 0))
    throw std::invalid_argument("seq-mean-token-sum-norm needs norm_constant > 0");
  if ((entropy == 0) != (grad_entropy == 0)) throw std::invalid_argument("entropy and grad_entropy go together");
  auto go = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto in = [](uintptr_t p) { return reinterpret_cast<const T*>(p); };
    with_steps<T>(step_dtype, token_step, in(logp), in(old_logp), in(advantages), n, num_steps, in(weights),
                  in(entropy), in(ref_logp), ratio_level == 1, clip_low, clip_high, dual_clip, agg_mode,
                  entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps, norm_constant,
                  reinterpret_cast<double*>(loss), reinterpret_cast<double*>(metrics),
                  reinterpret_cast<T*>(grad_logp), reinterpret_cast<T*>(grad_entropy));
  };
  if (float_dtype == kFloat32) {
    go(static_cast<float*>(nullptr));
  } else if (float_dtype == kFloat64) {
    go(static_cast<double*>(nullptr));
  } else {
    bad_dtype("logp", float_dtype);
  }
}

}  // namespace steppo
