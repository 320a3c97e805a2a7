"""Token log-probs and entropy (SPEC section 2) in Triton, forward and fused backward.

Reference (``steppo_fast.reference.token_logprob_stats`` / ``token_logprobs_backward``)::

    u = z / tau; lse = logsumexp(u); logp = u[y] - lse; H = lse - sum softmax(u) * u
    dL/dz = (g_logp (onehot(y) - p) - g_H p (log p + H)) / tau

Memory traffic of the naive PyTorch version, for N rows of V logits in bf16: log_softmax
reads 2 bytes and writes 4 bytes (fp32 upcast) per entry, softmax and the entropy product
each read and write another fp32 N x V, and autograd reads them again in the backward:
about 30 bytes per entry and three N x V fp32 temporaries. Here the forward reads each
masked-in row once (2 bytes per entry) and keeps three floats per row (logp, H, lse);
the backward reads the row once more and writes the gradient once (4 bytes per entry),
into the logits buffer itself when asked. Masked-out rows are skipped in the forward and
only written as zeros in the backward.

Both kernels loop over rows (so N is not limited by the grid) and over the vocabulary in
chunks of BLOCK_V entries (so any V works), with 64-bit row offsets (N x V > 2^31 works).

Instruction budget. A bf16 read at the H200's copy bandwidth needs about 8 entries per clock
per SM, and an SM issues 128 thread instructions per clock: the inner loops must stay near
12 instructions per entry or fewer to be limited by memory rather than by issue. So:

* A chunk is a (BLOCK_V / W, W) tile: each thread owns whole rows of W entries, one 16-byte
  load each. The forward keeps an online softmax per tile row ("lane") in registers across
  chunks: max, sum of 2^d and sum of 2^d d, rescaled once per lane per chunk (one exp2 per W
  entries), and merges the lanes once per row at the end. No reduction across threads, no
  barrier and no shared memory in the loop.
* Logits are scaled to base 2 once: d = z * log2(e) / tau - m is one FMA and 2^d one
  MUFU.EX2 (``ex2.approx.ftz``; results below 2^-126 are far below float32's resolution of
  these sums).
* The label's chunk and the partial last chunk leave the loop: the loop body has no mask and
  no select; those two chunks run a masked copy of it. The label is kept out of the sums,
  so that when p(label) is close to 1, logp = -log1p(s_other / e_label) and
  1 - p(label) = -expm1(logp) keep their precision instead of cancelling.
* The backward writes g = 2^d (A + B d) with the row's constants A and B: an FMA and a
  multiply per entry, and a plain conversion to bf16 (two entries per instruction).

``benchmarks/results/sass_counts.md`` has the instruction counts of the compiled loops.
"""

import torch
import triton
import triton.language as tl

from steppo_fast.ops import row_geometry  # (n_rows, vocab, rows_per_batch, stride_b, stride_t)

from .launch import interpreted, launch

# Entries of the vocabulary per loop iteration: 4096 over 8 warps is 16 per thread (two
# 16-byte loads in bf16), enough in flight to stream from HBM with several programs per SM.
# Below 4096 entries one smaller chunk over 4 warps; only these two sizes are ever compiled.
BLOCK_V = 4096
SMALL_BLOCK_V = 1024
# Programs launched at most; each loops over rows n, n + grid, ... (the grid is never the limit).
MAX_GRID = 1 << 20
LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# d (the logit in base-2 units minus the running max) is clamped here where it multiplies
# 2^d: 2^-200 is 0 in float32, and a -inf logit then adds 0 * -200 rather than 0 * -inf.
D_MIN: tl.constexpr = tl.constexpr(-200.0)
# The running max starts finite, so that a chunk of -inf logits never computes -inf - (-inf).
M_INIT: tl.constexpr = tl.constexpr(-1e30)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _to_acc(z, ACC: tl.constexpr, FAST: tl.constexpr):
    if FAST and z.dtype == tl.bfloat16:
        # Two bf16 per register: the low one shifted up, the high one masked; one instruction
        # per entry where the compiler's conversion takes one and a half.
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [z],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return z.to(ACC)


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0: Taylor to x^6 for |x| < 0.1 (truncation < 3e-10
    # relative), exp(x) - 1 beyond (relative error < 1.2e-6 there in fp32).
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(tl.abs(x) < 0.1, small, tl.exp(x) - 1.0)


@triton.jit
def _to_bf16_bits(x):
    # float32 -> bfloat16 bit pattern, rounded to nearest even; NaN gives 0x7FFF (the GPU's
    # canonical NaN) and overflow goes to inf. The interpreter truncates where the GPU rounds,
    # so under the interpreter the gradient is written through this.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FFF, rounded).to(tl.int16)


@triton.jit
def _fwd_update(z, m, s, t, k, WITH_ENTROPY: tl.constexpr, FAST: tl.constexpr):
    # One chunk into the per-lane state. z: (R, W) logits (-inf where left out); m: (R,) max of
    # z * k so far; s: (R,) sum of 2^(z k - m); t: (R,) sum of 2^(z k - m) (z k - m).
    m_new = tl.maximum(m, tl.max(z, 1) * k)
    shift = m - m_new
    alpha = _exp2(shift, FAST)
    d = z * k - m_new[:, None]
    if WITH_ENTROPY:
        # NaN stays NaN (and so does the row): a NaN logit must not be clamped away.
        d = tl.maximum(d, D_MIN, propagate_nan=tl.PropagateNan.ALL)
        e = _exp2(d, FAST)
        t = alpha * (t + shift * s) + tl.sum(e * d, 1)
    else:
        e = _exp2(d, FAST)
    s = alpha * s + tl.sum(e, 1)
    return m_new, s, t


@triton.jit(do_not_specialize=["n_rows", "rows_per_batch"])
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr,  # pointers
    n_rows, vocab, rows_per_batch,  # sizes
    stride_b, stride_t,  # strides (elements) of the logits rows; the vocabulary is contiguous
    scale: tl.float64,  # log2(e) / temperature
    BLOCK_V: tl.constexpr, W: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
    UNROLL: tl.constexpr,
):
    R: tl.constexpr = BLOCK_V // W
    k = tl.cast(scale, ACC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    neg_inf = float("-inf")
    lanes = tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]  # (R, W) offsets in a chunk
    n_full = vocab // BLOCK_V
    for row in range(pid, n_rows, nprog):
        r = tl.cast(row, tl.int64)
        keep = tl.load(mask_ptr + r) != 0
        if keep:
            base = logits_ptr + (r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t
            y = tl.load(labels_ptr + r).to(tl.int64)
            y_ok = (y >= 0) & (y < vocab)
            z_y = tl.load(base + y, mask=y_ok, other=float("nan")).to(ACC)
            # The label's chunk, when it is a full one, is left out of the loop (skipped by index).
            y_chunk = tl.where(y_ok, (y // BLOCK_V).to(tl.int32), n_full)
            label_full = y_chunk < n_full
            m = tl.full([R], M_INIT, ACC)
            s = tl.zeros([R], ACC)
            t = tl.zeros([R], ACC)
            for i in tl.range(0, n_full - label_full.to(tl.int32), loop_unroll_factor=UNROLL):
                c0 = (i + (i >= y_chunk).to(tl.int32)).to(tl.int64) * BLOCK_V
                z = _to_acc(tl.load(base + c0 + lanes), ACC, FAST)
                m, s, t = _fwd_update(z, m, s, t, k, WITH_ENTROPY, FAST)
            if label_full:
                cols = y_chunk.to(tl.int64) * BLOCK_V + lanes
                z = tl.where(cols == y, neg_inf, tl.load(base + cols).to(ACC))
                m, s, t = _fwd_update(z, m, s, t, k, WITH_ENTROPY, FAST)
            if n_full * BLOCK_V < vocab:  # the partial last chunk
                cols = tl.cast(n_full, tl.int64) * BLOCK_V + lanes
                z = tl.load(base + cols, mask=cols < vocab, other=neg_inf).to(ACC)
                z = tl.where(cols == y, neg_inf, z)
                m, s, t = _fwd_update(z, m, s, t, k, WITH_ENTROPY, FAST)
            # Merge the lanes, with the label's logit in the max (so that its 2^d cannot overflow).
            m_all = tl.maximum(tl.max(m, 0), z_y * k)
            a = _exp2(m - m_all, FAST)
            s_other = tl.sum(a * s, 0)
            d_y = z_y * k - m_all
            e_y = _exp2(d_y, FAST)
            s_all = s_other + e_y
            log_s = tl.log(s_all)
            # p(label) >= 1/2: -log1p(s / e_y), computed as -log(1 + x) with the usual correction.
            x = s_other / e_y
            one_x = 1.0 + x
            log1p_x = tl.where(one_x == 1.0, x, tl.log(one_x) * (x / (one_x - 1.0)))
            logp = tl.where(e_y >= s_other, -log1p_x, d_y * LN2 - log_s)
            tl.store(logp_ptr + r, logp)
            # float64: u - lse in the backward must not inherit a float rounding of lse (2^-24 |lse|).
            tl.store(lse_ptr + r, m_all.to(tl.float64) * LN2 + log_s.to(tl.float64))
            if WITH_ENTROPY:
                t_other = tl.sum(a * (t + (m - m_all) * s), 0)
                t_all = t_other + tl.where(e_y > 0.0, e_y * d_y, 0.0)
                tl.store(ent_ptr + r, log_s - LN2 * (t_all / s_all))
            else:
                tl.store(ent_ptr + r, tl.full([], 0.0, ACC))
        else:
            tl.store(logp_ptr + r, tl.full([], 0.0, ACC))
            tl.store(ent_ptr + r, tl.full([], 0.0, ACC))
            tl.store(lse_ptr + r, tl.full([], 0.0, tl.float64))


@triton.jit
def _bwd_grad(z, k, lse_hi, lse_lo, coef_a, coef_b, WITH_ENTROPY: tl.constexpr, PRECISE: tl.constexpr,
              FAST: tl.constexpr):
    # dL/dz = p (A + B d) with d = log2 p = z k - lse2, for every entry but the label.
    d = z * k - lse_hi
    if PRECISE:
        d = d - lse_lo
    if WITH_ENTROPY:
        d = tl.maximum(d, D_MIN, propagate_nan=tl.PropagateNan.ALL)
        g = _exp2(d, FAST) * (coef_a + coef_b * d)
    else:
        g = _exp2(d, FAST) * coef_a
    return g


@triton.jit
def _store_grad(ptrs, g, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        tl.store(ptrs, _to_bf16_bits(g.to(tl.float32)), mask=mask)
    else:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "rows_per_batch"])
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr, glogp_ptr, gent_ptr, grad_ptr,  # pointers
    n_rows, vocab, rows_per_batch,  # sizes
    stride_b, stride_t, gstride_b, gstride_t,  # strides (elements) of logits and grad rows
    scale: tl.float64, inv_temperature: tl.float64,  # log2(e) / temperature, 1 / temperature
    BLOCK_V: tl.constexpr, W: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
    PRECISE: tl.constexpr, BF16_BITS: tl.constexpr, UNROLL: tl.constexpr,
):
    # PRECISE: lse in two ACC parts (float32 and float64 gradients); a bf16/fp16 gradient does not
    # see the 2^-24 |lse| of one part. BF16_BITS: grad_ptr is the bf16 gradient viewed as int16,
    # written through _to_bf16_bits (under the interpreter only).
    R: tl.constexpr = BLOCK_V // W
    k = tl.cast(scale, ACC)
    inv_tau = tl.cast(inv_temperature, ACC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]
    n_full = vocab // BLOCK_V
    for row in range(pid, n_rows, nprog):
        r = tl.cast(row, tl.int64)
        gbase = grad_ptr + (r // rows_per_batch) * gstride_b + (r % rows_per_batch) * gstride_t
        keep = tl.load(mask_ptr + r) != 0
        if keep:
            base = logits_ptr + (r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t
            y = tl.load(labels_ptr + r).to(tl.int64)
            y_ok = (y >= 0) & (y < vocab)
            lse2 = tl.load(lse_ptr + r) * 1.4426950408889634  # float64: log2-sum-exp of z k
            lse_hi = lse2.to(ACC)
            lse_lo = (lse2 - lse_hi.to(tl.float64)).to(ACC)
            lp_y = tl.load(logp_ptr + r)
            g_lp = tl.load(glogp_ptr + r).to(ACC)
            p_y = tl.exp(lp_y)
            if WITH_ENTROPY:
                h = tl.load(ent_ptr + r)
                g_h = tl.load(gent_ptr + r).to(ACC)
                term_y = tl.where(p_y > 0.0, p_y * (lp_y + h), 0.0)
                coef_a = -(g_lp + g_h * h) * inv_tau
                coef_b = -g_h * (LN2 * inv_tau)
            else:
                g_h = tl.full([], 0.0, ACC)
                term_y = tl.full([], 0.0, ACC)
                coef_a = -g_lp * inv_tau
                coef_b = tl.full([], 0.0, ACC)
            grad_y = (g_lp * -_expm1(lp_y) - g_h * term_y) * inv_tau
            y_chunk = tl.where(y_ok, (y // BLOCK_V).to(tl.int32), n_full)
            label_full = y_chunk < n_full
            for i in tl.range(0, n_full - label_full.to(tl.int32), loop_unroll_factor=UNROLL):
                c0 = (i + (i >= y_chunk).to(tl.int32)).to(tl.int64) * BLOCK_V
                z = _to_acc(tl.load(base + c0 + lanes), ACC, FAST)
                g = _bwd_grad(z, k, lse_hi, lse_lo, coef_a, coef_b, WITH_ENTROPY, PRECISE, FAST)
                _store_grad(gbase + c0 + lanes, g, None, BF16_BITS)
            if label_full:
                cols = y_chunk.to(tl.int64) * BLOCK_V + lanes
                z = tl.load(base + cols).to(ACC)
                g = _bwd_grad(z, k, lse_hi, lse_lo, coef_a, coef_b, WITH_ENTROPY, PRECISE, FAST)
                _store_grad(gbase + cols, tl.where(cols == y, grad_y, g), None, BF16_BITS)
            if n_full * BLOCK_V < vocab:
                cols = tl.cast(n_full, tl.int64) * BLOCK_V + lanes
                z = tl.load(base + cols, mask=cols < vocab, other=0.0).to(ACC)
                g = _bwd_grad(z, k, lse_hi, lse_lo, coef_a, coef_b, WITH_ENTROPY, PRECISE, FAST)
                _store_grad(gbase + cols, tl.where(cols == y, grad_y, g), cols < vocab, BF16_BITS)
        else:
            zero = tl.zeros([R, W], dtype=grad_ptr.dtype.element_ty)
            for c0 in range(0, vocab, BLOCK_V):
                cols = c0 + lanes.to(tl.int64)
                tl.store(gbase + cols, zero, mask=cols < vocab)


# ------------------------------------------------------------------ launchers
def _config(logits: torch.Tensor):
    """(BLOCK_V, W, num_warps): W entries (16 bytes) per tile row. float64 logits (the oracle's
    dtype) take a quarter of the chunk, which keeps their registers from spilling."""
    block, warps = (BLOCK_V, 8) if logits.shape[-1] >= BLOCK_V else (SMALL_BLOCK_V, 4)
    if logits.element_size() == 8:
        block, warps = block // 4, 8
    return block, max(1, 16 // logits.element_size()), warps


def _unroll(*tensors) -> int:
    """Chunks per loop iteration: two where every row starts 16-byte aligned (Triton then knows it
    from the strides' divisibility by 16 and loads 16 bytes at a time: two chunks' loads in flight);
    one otherwise, where single-entry loads would need twice the registers."""
    for t in tensors:
        n, vocab, rpb, sb, st = row_geometry(t)
        if t.data_ptr() % 16 or sb % 16 or st % 16:
            return 1
    return 2


def _acc(logits: torch.Tensor):
    return (tl.float64, torch.float64) if logits.dtype == torch.float64 else (tl.float32, torch.float32)


def token_logprobs_fwd(logits, labels, mask, temperature: float, with_entropy: bool):
    """(logp, entropy, lse), each (N,): logp and entropy float32 (float64 for float64 logits), lse float64.

    logits: (N, V) or (B, T, V) float32/bfloat16/float16/float64 with a contiguous last dim;
    labels: (N,) int32/int64 contiguous; mask: (N,) bool contiguous.
    """
    n, vocab, rpb, sb, st = row_geometry(logits)
    acc_tl, acc_torch = _acc(logits)
    logp = torch.empty(n, dtype=acc_torch, device=logits.device)
    ent = torch.empty_like(logp)
    lse = torch.empty(n, dtype=torch.float64, device=logits.device)
    if n == 0:
        return logp, ent, lse
    block, width, warps = _config(logits)
    kernel = _token_logprobs_fwd_kernel
    fast = acc_tl == tl.float32 and not interpreted(kernel)
    launch(kernel, (min(n, MAX_GRID),), logits.device,
           logits, labels, mask.view(torch.uint8), logp, ent, lse, n, vocab, rpb, sb, st, LOG2E / temperature,
           BLOCK_V=block, W=width, WITH_ENTROPY=bool(with_entropy), ACC=acc_tl, FAST=fast, UNROLL=_unroll(logits),
           num_warps=warps, enable_fp_fusion=True)
    return logp, ent, lse


def token_logprobs_bwd(logits, labels, mask, logp, ent, lse, grad_logp, grad_entropy, temperature: float,
                       with_entropy: bool, out):
    """Writes dL/dlogits into ``out`` (logits' shape and dtype; may be ``logits`` itself) and returns it."""
    n, vocab, rpb, sb, st = row_geometry(logits)
    _, _, _, gsb, gst = row_geometry(out)
    if n == 0:
        return out
    acc_tl, _ = _acc(logits)
    block, width, warps = _config(logits)
    kernel = _token_logprobs_bwd_kernel
    interp = interpreted(kernel)
    fast = acc_tl == tl.float32 and not interp
    bits = interp and out.dtype == torch.bfloat16
    precise = out.dtype in (torch.float32, torch.float64)
    launch(kernel, (min(n, MAX_GRID),), logits.device,
           logits, labels, mask.view(torch.uint8), logp, ent, lse, grad_logp, grad_entropy,
           out.view(torch.int16) if bits else out, n, vocab, rpb, sb, st, gsb, gst, LOG2E / temperature,
           1.0 / temperature, BLOCK_V=block, W=width, WITH_ENTROPY=bool(with_entropy), ACC=acc_tl, FAST=fast,
           PRECISE=precise, BF16_BITS=bits, UNROLL=_unroll(logits, out), num_warps=warps, enable_fp_fusion=True)
    return out
