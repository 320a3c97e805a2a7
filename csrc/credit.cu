// Credit assignment on the GPU (SPEC sections 4-6): token broadcast, step and token GAE,
// whitening and group normalisation (GRPO, RLOO, GiGPO step groups).
//
// Nothing here synchronises with the host or loops over rows on it: a GAE is one launch,
// whitening two plus one, a group normalisation two radix sorts plus three small launches.
// Every reduction has a fixed order that depends only on the sizes, never on scheduling,
// so the same inputs give the same bits. Token positions are 64-bit throughout.
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>
#include <stdexcept>

#include "credit_cuda.h"
#include "cuda_check.cuh"
#include "cuda_common.cuh"

namespace steppo {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;

// ---------------------------------------------------------------- GAE
// GAE backwards over positions begin..end-1 of one trajectory, by one warp. With c = gamma lam,
// A_i = delta_i + c A_{i+1} is the composition of the affine maps f_i(x) = delta_i + c x, so a
// tile of 32 positions is one reverse scan of (offset, factor) pairs in the warp, applied to the
// advantage carried in from the tile after it. Loads are coalesced (lane = position) and each
// element is read once and written once.
//
// Index checks: the caller has checked begin..end against the index array; idx.ok(e) checks the
// element each position names. A position whose element is out of range reads and writes nothing
// and enters the recurrence as NaN, so every earlier position of the trajectory (all of which
// depend on it) gets NaN and the later ones keep their values; its position lowers *bad.
struct Identity {
  __device__ __forceinline__ int64_t operator()(int64_t i) const { return i; }
  __device__ __forceinline__ bool ok(int64_t) const { return true; }
};

struct Gather {
  const int64_t* __restrict__ tok;
  int64_t size;  // elements of the rewards, values and outputs
  __device__ __forceinline__ int64_t operator()(int64_t i) const { return tok[i]; }
  __device__ __forceinline__ bool ok(int64_t e) const { return in_range_dev(e, size); }
};

template <typename Index>
__device__ void gae_warp(int64_t begin, int64_t end, Index idx, DevIn r, DevIn v, double gamma, double lam,
                         DevOut adv, DevOut ret, int lane, int64_t* bad) {
  const double c = gamma * lam;
  double carry_a = 0.0, carry_v = 0.0;  // A and V of the first position of the tile after this one
  const int64_t tiles = (end - begin + 31) / 32;
  for (int64_t t = tiles - 1; t >= 0; --t) {
    const int64_t i = begin + t * 32 + lane;
    const bool valid = i < end;
    int64_t e = 0;
    bool inside = false;
    double ve = 0.0, re = 0.0;
    if (valid) {
      e = idx(i);
      inside = idx.ok(e);
      if (inside) {
        ve = v[e];
        re = r[e];
      } else {
        ve = re = nan_dev();
        report_bad(bad, i);
      }
    }
    // V of the next position: the next lane's, or the carried one for the last lane. Past the
    // trajectory's end the lanes hold V = 0, as the recurrence wants.
    double vn = __shfl_down_sync(kFull, ve, 1);
    if (lane == 31) vn = carry_v;
    double a = valid ? re + gamma * vn - ve : 0.0;  // idle lanes are the identity map (0, 1)
    double m = valid ? c : 1.0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const double a2 = __shfl_down_sync(kFull, a, off);
      const double m2 = __shfl_down_sync(kFull, m, off);
      if (lane + off < 32) {
        a = a + m * a2;
        m = m * m2;
      }
    }
    const double A = a + m * carry_a;
    if (inside) {
      adv.set(e, A);
      ret.set(e, A + ve);
    }
    carry_a = __shfl_sync(kFull, A, 0);
    carry_v = __shfl_sync(kFull, ve, 0);
  }
}

// NaN at positions lo..hi-1 of both outputs, by one warp.
__device__ void nan_steps(int64_t lo, int64_t hi, DevOut adv, DevOut ret, int lane) {
  for (int64_t i = lo + lane; i < hi; i += 32) {
    adv.set(i, nan_dev());
    ret.set(i, nan_dev());
  }
}

// How offsets that are not a partition are still covered. Offsets toff[0..R] over S entries are
// a partition of [0, S) exactly when toff[0] == 0, toff[R] == S and every pair is in order and in
// range. Otherwise every position p in [0, S) still lies in [x, y) for some consecutive x <= y of
// the sequence 0, toff[0], ..., toff[R], S; so NaN over [0, toff[0]) and [toff[R], S) (clamped to
// [0, S]) and over the clamped range of every in-order pair that is out of range leaves no output
// unwritten. With out-of-order offsets two trajectories' ranges may overlap: the overlap then
// holds one of their values (the error word is set in any case).

__global__ void step_gae_kernel(DevIn r, DevIn v, int64_t num_steps, const int64_t* __restrict__ toff,
                                int64_t num_traj, double gamma, double lam, DevOut adv, DevOut ret,
                                int64_t* __restrict__ err) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (first == 0) {  // the ends, once per call (check_csr_ends on the CPU)
    const int64_t head = toff[0], tail = toff[num_traj];
    if (lane == 0 && head != 0) report_bad(err, 0);
    if (lane == 0 && tail != num_steps) report_bad(err, num_traj);
    nan_steps(0, clamp_dev(head, 0, num_steps), adv, ret, lane);
    nan_steps(clamp_dev(tail, 0, num_steps), num_steps, adv, ret, lane);
  }
  for (int64_t j = first; j < num_traj; j += warps) {
    const int64_t b = toff[j], e = toff[j + 1];
    if (!pair_ok_dev(b, e, num_steps)) {
      if (lane == 0) report_bad(err, j);
      nan_steps(clamp_dev(b, 0, num_steps), clamp_dev(e, 0, num_steps), adv, ret, lane);
      continue;
    }
    gae_warp(b, e, Identity{}, r, v, gamma, lam, adv, ret, lane, err);
  }
}

// NaN at the in-range tokens of steps k0..k1-1 (0 <= k0, k1 <= num_steps) whose offsets are in
// order and in range, by one warp: the outputs a trajectory with a bad step or bad offsets would
// have filled, as far as they can be told.
__device__ void nan_tokens(int64_t k0, int64_t k1, const int64_t* __restrict__ tok, int64_t n_step_tokens,
                           const int64_t* __restrict__ soff, int64_t n_tokens, DevOut adv, DevOut ret, int lane) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = soff[k], e = soff[k + 1];
    if (!pair_ok_dev(b, e, n_step_tokens)) continue;
    for (int64_t i = b + lane; i < e; i += 32) {
      const int64_t t = tok[i];
      if (in_range_dev(t, n_tokens)) {
        adv.set(t, nan_dev());
        ret.set(t, nan_dev());
      }
    }
  }
}

// err[0]: traj_step_offsets, err[1]: step_token_offsets, err[2]: step_tokens (first bad position).
__global__ void token_gae_kernel(DevIn r, DevIn v, int64_t n_tokens, const int64_t* __restrict__ tok,
                                 int64_t n_step_tokens, const int64_t* __restrict__ soff, int64_t num_steps,
                                 const int64_t* __restrict__ toff, int64_t num_traj, double gamma, double lam,
                                 DevOut adv, DevOut ret, int64_t* __restrict__ err) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (first == 0) {  // the ends of both offset arrays, once per call
    const int64_t head = toff[0], tail = toff[num_traj];
    if (lane == 0) {
      if (head != 0) report_bad(err, 0);
      if (tail != num_steps) report_bad(err, num_traj);
      if (soff[0] != 0) report_bad(err + 1, 0);
      if (soff[num_steps] != n_step_tokens) report_bad(err + 1, num_steps);
    }
    nan_tokens(0, clamp_dev(head, 0, num_steps), tok, n_step_tokens, soff, n_tokens, adv, ret, lane);
    nan_tokens(clamp_dev(tail, 0, num_steps), num_steps, tok, n_step_tokens, soff, n_tokens, adv, ret, lane);
  }
  for (int64_t j = first; j < num_traj; j += warps) {
    const int64_t b = toff[j], e = toff[j + 1];
    if (!pair_ok_dev(b, e, num_steps)) {
      if (lane == 0) report_bad(err, j);
      nan_tokens(clamp_dev(b, 0, num_steps), clamp_dev(e, 0, num_steps), tok, n_step_tokens, soff, n_tokens, adv,
                 ret, lane);
      continue;
    }
    // Every step pair of the trajectory in order and in range: then its agent tokens in time order
    // are the one contiguous range soff[b]..soff[e] of step_tokens, inside [0, n_step_tokens].
    int64_t bad_step = kNoError;
    for (int64_t k = b + lane; k < e; k += 32)
      if (!pair_ok_dev(soff[k], soff[k + 1], n_step_tokens) && k < bad_step) bad_step = k;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const int64_t o = __shfl_xor_sync(kFull, bad_step, off);
      bad_step = o < bad_step ? o : bad_step;
    }
    if (bad_step != kNoError) {
      if (lane == 0) report_bad(err + 1, bad_step);
      nan_tokens(b, e, tok, n_step_tokens, soff, n_tokens, adv, ret, lane);
      continue;
    }
    gae_warp(soff[b], soff[e], Gather{tok, n_tokens}, r, v, gamma, lam, adv, ret, lane, err + 2);
  }
}

// ---------------------------------------------------------------- broadcast
// An id >= num_values is not read: the token gets NaN and its position lowers *err.
__global__ void broadcast_kernel(DevIn v, int64_t num_values, const int32_t* __restrict__ token_step, int64_t n,
                                 DevOut out, int64_t* __restrict__ err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += stride) {
    const int32_t s = token_step[t];
    if (s >= num_values) {
      report_bad(err, t);
      out.set(t, nan_dev());
      continue;
    }
    out.set(t, s >= 0 ? v[s] : 0.0);
  }
}

// ---------------------------------------------------------------- whitening
struct Moments {
  double c, s, q;
};

struct MomentsSum {
  __device__ __forceinline__ Moments operator()(const Moments& a, const Moments& b) const {
    return {a.c + b.c, a.s + b.s, a.q + b.q};
  }
};

constexpr int64_t kMomentsMaxBlocks = 1024;

// The block count is a function of n alone, so the partial sums, and their order, are too.
int64_t moments_blocks(int64_t n) {
  int64_t b = (n + kThreads * 16 - 1) / (kThreads * 16);
  if (b > kMomentsMaxBlocks) b = kMomentsMaxBlocks;
  return b < 1 ? 1 : b;
}

__global__ void moments_partial_kernel(DevIn x, const bool* __restrict__ mask, int64_t n, double* __restrict__ part) {
  using Reduce = cub::BlockReduce<Moments, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  Moments m{0.0, 0.0, 0.0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (mask != nullptr && !mask[i]) continue;
    const double xi = x[i];
    m.c += 1.0;
    m.s += xi;
    m.q += xi * xi;
  }
  const Moments tot = Reduce(tmp).Reduce(m, MomentsSum{});
  if (threadIdx.x == 0) {
    part[3 * blockIdx.x] = tot.c;
    part[3 * blockIdx.x + 1] = tot.s;
    part[3 * blockIdx.x + 2] = tot.q;
  }
}

__global__ void moments_final_kernel(const double* __restrict__ part, int64_t blocks, double* __restrict__ out) {
  using Reduce = cub::BlockReduce<Moments, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  Moments m{0.0, 0.0, 0.0};
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    m.c += part[3 * b];
    m.s += part[3 * b + 1];
    m.q += part[3 * b + 2];
  }
  const Moments tot = Reduce(tmp).Reduce(m, MomentsSum{});
  if (threadIdx.x == 0) {
    out[0] = tot.c;
    out[1] = tot.s;
    out[2] = tot.q;
  }
}

__global__ void whiten_apply_kernel(DevIn x, const bool* __restrict__ mask, int64_t n, const double* __restrict__ mo,
                                    int mode, double eps, DevOut out) {
  // Same formulas, and the same NaN behaviour, as whiten_apply_cpu.
  const double cnt = mo[0], s = mo[1], ss = mo[2];
  const double mean = s / (cnt < 1.0 ? 1.0 : cnt);
  double var = cnt >= 2.0 ? (ss - s * mean) / (cnt - 1.0) : 0.0;
  var = var < 0.0 ? 0.0 : var;
  const double scale = mode == 0 ? 1.0 / (sqrt(var) + eps) : 1.0 / sqrt(var + eps);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool keep = mask == nullptr || mask[i];
    out.set(i, keep ? (x[i] - mean) * scale : 0.0);
  }
}

// ---------------------------------------------------------------- groups
__global__ void iota_kernel(int64_t* __restrict__ idx, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) idx[i] = i;
}

__global__ void gather_kernel(const int64_t* __restrict__ src, const int64_t* __restrict__ idx, int64_t n,
                              int64_t* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[idx[i]];
}

// One thread per sorted position; the first member of each group walks the group in sorted
// (stable, hence original) order, exactly like group_advantage_cpu.
__global__ void group_kernel(DevIn v, const int64_t* __restrict__ g, const int64_t* __restrict__ k,
                             const int64_t* __restrict__ order, int64_t n, int norm, int singleton, double eps,
                             DevOut out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t a = order[i];
    const int64_t ga = g[a], ka = k != nullptr ? k[a] : 0;
    if (i > 0) {
      const int64_t p = order[i - 1];
      if (g[p] == ga && (k == nullptr || k[p] == ka)) continue;  // not the group's first member
    }
    int64_t e = i + 1;
    while (e < n) {
      const int64_t b = order[e];
      if (g[b] != ga || (k != nullptr && k[b] != ka)) break;
      ++e;
    }
    if (e - i == 1) {
      const double x = v[a];
      out.set(a, singleton == 1 ? 0.0 : (norm == 0 ? x / (1.0 + eps) : x));
      continue;
    }
    const double cnt = static_cast<double>(e - i);
    double sum = 0.0;
    for (int64_t j = i; j < e; ++j) sum += v[order[j]];
    const double mean = sum / cnt;
    double inv_std = 1.0;
    if (norm == 0) {
      double dev2 = 0.0;
      for (int64_t j = i; j < e; ++j) {
        const double d = v[order[j]] - mean;
        dev2 += d * d;
      }
      inv_std = 1.0 / (sqrt(dev2 / (cnt - 1.0)) + eps);
    }
    for (int64_t j = i; j < e; ++j) {
      const double d = v[order[j]] - mean;
      out.set(order[j], norm == 0 ? d * inv_std : (norm == 1 ? d : cnt * d / (cnt - 1.0)));
    }
  }
}

constexpr int64_t kAlign = 256;

int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

size_t sort_temp_bytes(int64_t n) {
  size_t temp = 0;
  STEPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const int64_t*>(nullptr),
                                                    static_cast<int64_t*>(nullptr),
                                                    static_cast<const int64_t*>(nullptr),
                                                    static_cast<int64_t*>(nullptr), n, 0, 64));
  return temp;
}

// The GAE kernels run one warp per trajectory, and at least one warp, which checks the offsets'
// ends even when there is no trajectory.
unsigned gae_blocks(int64_t num_trajectories) {
  return grid_for((num_trajectories > 0 ? num_trajectories : 1) * 32, kThreads);
}

template <typename T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

}  // namespace

void broadcast_to_tokens_cuda(uintptr_t step_values, int values_dtype, int64_t num_values, uintptr_t token_step,
                              int64_t n, uintptr_t out, int out_dtype, uintptr_t err, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("step_values", values_dtype);
  check_out_dtype("out", out_dtype);
  require_error_words(err);
  if (n == 0) return;
  broadcast_kernel<<<grid_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      DevIn{cptr<void>(step_values), values_dtype}, num_values, cptr<int32_t>(token_step), n,
      DevOut{reinterpret_cast<void*>(out), out_dtype}, reinterpret_cast<int64_t*>(err));
  STEPPO_CUDA_CHECK_LAUNCH("broadcast_kernel");
}

void step_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t num_steps,
                   uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                   uintptr_t ret, int out_dtype, uintptr_t err, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("step_rewards", rewards_dtype);
  check_in_dtype("step_values", values_dtype);
  check_out_dtype("adv", out_dtype);
  require_error_words(err);
  if (num_trajectories < 0) throw std::invalid_argument("traj_step_offsets must hold at least one offset");
  step_gae_kernel<<<gae_blocks(num_trajectories), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      DevIn{cptr<void>(rewards), rewards_dtype}, DevIn{cptr<void>(values), values_dtype}, num_steps,
      cptr<int64_t>(traj_step_offsets), num_trajectories, gamma, lam, DevOut{reinterpret_cast<void*>(adv), out_dtype},
      DevOut{reinterpret_cast<void*>(ret), out_dtype}, reinterpret_cast<int64_t*>(err));
  STEPPO_CUDA_CHECK_LAUNCH("step_gae_kernel");
}

void token_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                    uintptr_t step_tokens, int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps,
                    uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                    uintptr_t ret, int out_dtype, uintptr_t err, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("token_rewards", rewards_dtype);
  check_in_dtype("token_values", values_dtype);
  check_out_dtype("adv", out_dtype);
  require_error_words(err);
  if (num_trajectories < 0) throw std::invalid_argument("traj_step_offsets must hold at least one offset");
  if (num_steps < 0) throw std::invalid_argument("step_token_offsets must hold at least one offset");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const size_t bytes = static_cast<size_t>(n_tokens) * (out_dtype == kFloat64 ? 8 : 4);
  // Tokens of no step get 0 (all-zero bits are 0.0 in both output dtypes).
  if (bytes > 0) {
    STEPPO_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(adv), 0, bytes, s));
    STEPPO_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(ret), 0, bytes, s));
  }
  token_gae_kernel<<<gae_blocks(num_trajectories), kThreads, 0, s>>>(
      DevIn{cptr<void>(rewards), rewards_dtype}, DevIn{cptr<void>(values), values_dtype}, n_tokens,
      cptr<int64_t>(step_tokens), n_step_tokens, cptr<int64_t>(step_token_offsets), num_steps,
      cptr<int64_t>(traj_step_offsets), num_trajectories, gamma, lam, DevOut{reinterpret_cast<void*>(adv), out_dtype},
      DevOut{reinterpret_cast<void*>(ret), out_dtype}, reinterpret_cast<int64_t*>(err));
  STEPPO_CUDA_CHECK_LAUNCH("token_gae_kernel");
}

int64_t whiten_moments_cuda_workspace(int64_t n) { return 3 * moments_blocks(n); }

void whiten_moments_cuda(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t out, uintptr_t workspace,
                         uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("x", x_dtype);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = moments_blocks(n);
  double* part = reinterpret_cast<double*>(workspace);
  // With n = 0 the single block writes zeros, so the moments are (0, 0, 0) as on the CPU.
  moments_partial_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(DevIn{cptr<void>(x), x_dtype},
                                                                            cptr<bool>(mask), n, part);
  STEPPO_CUDA_CHECK_LAUNCH("moments_partial_kernel");
  moments_final_kernel<<<1, kThreads, 0, s>>>(part, blocks, reinterpret_cast<double*>(out));
  STEPPO_CUDA_CHECK_LAUNCH("moments_final_kernel");
}

void whiten_apply_cuda(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t moments, int mode, double eps,
                       uintptr_t out, int out_dtype, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("x", x_dtype);
  check_out_dtype("out", out_dtype);
  if (mode != 0 && mode != 1) throw std::invalid_argument("mode must be 0 (step) or 1 (token)");
  if (n == 0) return;
  whiten_apply_kernel<<<grid_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      DevIn{cptr<void>(x), x_dtype}, cptr<bool>(mask), n, cptr<double>(moments), mode, eps,
      DevOut{reinterpret_cast<void*>(out), out_dtype});
  STEPPO_CUDA_CHECK_LAUNCH("whiten_apply_kernel");
}

int64_t group_advantage_cuda_workspace(int64_t n, int device) {
  const DeviceGuard guard(device);
  if (n == 0) return 0;
  return 4 * aligned(n * static_cast<int64_t>(sizeof(int64_t))) + aligned(static_cast<int64_t>(sort_temp_bytes(n)));
}

void group_advantage_cuda(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                          int norm, int singleton, double eps, uintptr_t out, int out_dtype, uintptr_t workspace,
                          int64_t workspace_bytes, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("values", values_dtype);
  check_out_dtype("out", out_dtype);
  if (norm < 0 || norm > 2) throw std::invalid_argument("norm must be 0 (mean_std), 1 (mean) or 2 (rloo)");
  if (singleton != 0 && singleton != 1) throw std::invalid_argument("singleton must be 0 (unit) or 1 (zero)");
  if (n == 0) return;
  size_t temp = sort_temp_bytes(n);
  const int64_t vec = aligned(n * static_cast<int64_t>(sizeof(int64_t)));
  if (workspace_bytes < 4 * vec + aligned(static_cast<int64_t>(temp)))
    throw std::invalid_argument("workspace is smaller than group_advantage_cuda_workspace(n)");
  auto* base = reinterpret_cast<char*>(workspace);
  auto* keys_a = reinterpret_cast<int64_t*>(base);
  auto* keys_b = reinterpret_cast<int64_t*>(base + vec);
  auto* idx_a = reinterpret_cast<int64_t*>(base + 2 * vec);
  auto* idx_b = reinterpret_cast<int64_t*>(base + 3 * vec);
  void* tmp = base + 4 * vec;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* g = cptr<int64_t>(group);
  const auto* k = cptr<int64_t>(subkey);
  const unsigned blocks = grid_for(n, kThreads);
  iota_kernel<<<blocks, kThreads, 0, s>>>(idx_a, n);
  STEPPO_CUDA_CHECK_LAUNCH("iota_kernel");
  // Least significant key first: a stable sort by subkey, then a stable sort by group.
  const int64_t* order = idx_b;
  if (k != nullptr) {
    STEPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, temp, k, keys_b, idx_a, idx_b, n, 0, 64, s));
    gather_kernel<<<blocks, kThreads, 0, s>>>(g, idx_b, n, keys_a);
    STEPPO_CUDA_CHECK_LAUNCH("gather_kernel");
    STEPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, temp, static_cast<const int64_t*>(keys_a), keys_b,
                                                      static_cast<const int64_t*>(idx_b), idx_a, n, 0, 64, s));
    order = idx_a;
  } else {
    STEPPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, temp, g, keys_b, static_cast<const int64_t*>(idx_a),
                                                      idx_b, n, 0, 64, s));
  }
  group_kernel<<<blocks, kThreads, 0, s>>>(DevIn{cptr<void>(values), values_dtype}, g, k, order, n, norm, singleton,
                                           eps, DevOut{reinterpret_cast<void*>(out), out_dtype});
  STEPPO_CUDA_CHECK_LAUNCH("group_kernel");
}

}  // namespace steppo
