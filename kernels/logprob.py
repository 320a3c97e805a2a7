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
BLOCK_V chunks (so any V works), with 64-bit row offsets (N x V > 2^31 works). The label is
kept out of the running sum: when p(label) is close to 1, logp = -log1p(s_other / e_label)
and 1 - p(label) = -expm1(logp) keep their precision instead of cancelling.
"""

import torch
import triton
import triton.language as tl

from steppo_fast.ops import row_geometry  # (n_rows, vocab, rows_per_batch, stride_b, stride_t)

# Chunk of the vocabulary one program holds in registers: 4096 fp32 over 8 warps is 16
# values per thread, enough in flight to stream from HBM without spilling.
MAX_BLOCK_V = 4096
# Programs launched at most; each loops over rows n, n + grid, ... (the grid is never the limit).
MAX_GRID = 1 << 20


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0: Taylor to x^6 for |x| < 0.1 (truncation < 3e-10
    # relative), exp(x) - 1 beyond (relative error < 1.2e-6 there in fp32).
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(tl.abs(x) < 0.1, small, tl.exp(x) - 1.0)


@triton.jit
def _to_bf16_bits(x):
    # float32 -> bfloat16 bit pattern, rounded to nearest even (NaN stays NaN, overflow goes to inf).
    # Done by hand so the interpreter, which truncates, and the GPU, which rounds, write the same bits.
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr,  # pointers
    n_rows, vocab, rows_per_batch,  # sizes
    stride_b, stride_t,  # strides (elements) of the logits rows; the vocabulary is contiguous
    inv_tau,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    neg_inf = float("-inf")
    for row in range(pid, n_rows, nprog):
        r = tl.cast(row, tl.int64)
        keep = tl.load(mask_ptr + r) != 0
        if keep:
            base = logits_ptr + (r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t
            y = tl.load(labels_ptr + r).to(tl.int64)
            y_ok = (y >= 0) & (y < vocab)
            u_y = tl.load(base + y, mask=y_ok, other=float("nan")).to(ACC) * inv_tau
            m = tl.full([], neg_inf, ACC)  # running max
            s = tl.full([], 0.0, ACC)  # sum of exp(u - m) over non-label entries
            t = tl.full([], 0.0, ACC)  # sum of exp(u - m) * (u - m) over non-label entries
            for c0 in range(0, vocab, BLOCK_V):
                cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
                valid = cols < vocab
                u = tl.load(base + cols, mask=valid, other=neg_inf).to(ACC) * inv_tau
                m_new = tl.maximum(m, tl.max(u, 0))
                shift = tl.where(m_new == neg_inf, 0.0, m_new)
                # Rescale the sums to the new shift; nothing to rescale while every entry was -inf.
                alpha = tl.where(m == neg_inf, 0.0, tl.exp(m - shift))
                diff = tl.where(m == neg_inf, 0.0, m - shift)
                t = alpha * (t + diff * s)
                s = alpha * s
                m = m_new
                d = u - shift
                e = tl.where(cols == y, 0.0, tl.exp(d))
                s += tl.sum(e, 0)
                if WITH_ENTROPY:
                    t += tl.sum(tl.where(e > 0.0, e * d, 0.0), 0)
            shift = tl.where(m == neg_inf, 0.0, m)
            d_y = u_y - shift
            e_y = tl.exp(d_y)
            s_all = s + e_y
            log_s = tl.log(s_all)
            # p(label) >= 1/2: -log1p(s / e_y), computed as -log(1 + x) with the usual correction.
            x = s / e_y
            one_x = 1.0 + x
            log1p_x = tl.where(one_x == 1.0, x, tl.log(one_x) * (x / (one_x - 1.0)))
            logp = tl.where(e_y >= s, -log1p_x, d_y - log_s)
            tl.store(logp_ptr + r, logp)
            # float64: u - lse in the backward must not inherit a float rounding of lse (2^-24 |lse|).
            tl.store(lse_ptr + r, shift.to(tl.float64) + log_s.to(tl.float64))
            if WITH_ENTROPY:
                t_all = t + tl.where(e_y > 0.0, e_y * d_y, 0.0)
                tl.store(ent_ptr + r, log_s - t_all / s_all)
            else:
                tl.store(ent_ptr + r, tl.full([], 0.0, ACC))
        else:
            tl.store(logp_ptr + r, tl.full([], 0.0, ACC))
            tl.store(ent_ptr + r, tl.full([], 0.0, ACC))
            tl.store(lse_ptr + r, tl.full([], 0.0, tl.float64))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr, glogp_ptr, gent_ptr, grad_ptr,  # pointers
    n_rows, vocab, rows_per_batch,  # sizes
    stride_b, stride_t, gstride_b, gstride_t,  # strides (elements) of logits and grad rows
    inv_tau,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, BF16_BITS: tl.constexpr,
):
    # BF16_BITS: grad_ptr is the bfloat16 gradient viewed as int16, written through _to_bf16_bits.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in range(pid, n_rows, nprog):
        r = tl.cast(row, tl.int64)
        gbase = grad_ptr + (r // rows_per_batch) * gstride_b + (r % rows_per_batch) * gstride_t
        keep = tl.load(mask_ptr + r) != 0
        if keep:
            base = logits_ptr + (r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t
            y = tl.load(labels_ptr + r).to(tl.int64)
            lse = tl.load(lse_ptr + r)  # float64, split in two ACC values: u - lse_hi is exact near the max
            lse_hi = lse.to(ACC)
            lse_lo = (lse - lse_hi.to(tl.float64)).to(ACC)
            lp_y = tl.load(logp_ptr + r)
            g_lp = tl.load(glogp_ptr + r).to(ACC)
            p_y = tl.exp(lp_y)
            if WITH_ENTROPY:
                h = tl.load(ent_ptr + r)
                g_h = tl.load(gent_ptr + r).to(ACC)
                term_y = tl.where(p_y > 0.0, p_y * (lp_y + h), 0.0)
            else:
                h = tl.full([], 0.0, ACC)
                g_h = tl.full([], 0.0, ACC)
                term_y = tl.full([], 0.0, ACC)
            grad_y = (g_lp * -_expm1(lp_y) - g_h * term_y) * inv_tau
            for c0 in range(0, vocab, BLOCK_V):
                cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
                valid = cols < vocab
                u = tl.load(base + cols, mask=valid, other=0.0).to(ACC) * inv_tau
                lp = (u - lse_hi) - lse_lo
                p = tl.exp(lp)
                g = -g_lp * p
                if WITH_ENTROPY:
                    g -= g_h * tl.where(p > 0.0, p * (lp + h), 0.0)
                g = tl.where(cols == y, grad_y, g * inv_tau)
                if BF16_BITS:
                    tl.store(gbase + cols, _to_bf16_bits(g.to(tl.float32)), mask=valid)
                else:
                    tl.store(gbase + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)
        else:
            for c0 in range(0, vocab, BLOCK_V):
                cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
                zero = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
                tl.store(gbase + cols, zero, mask=cols < vocab)


# ------------------------------------------------------------------ launchers
def _config(vocab: int):
    block = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 1)))
    warps = 8 if block >= 2048 else 4
    return block, warps


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
    block, warps = _config(vocab)
    grid = (min(n, MAX_GRID),)
    _token_logprobs_fwd_kernel[grid](
        logits, labels, mask.view(torch.uint8), logp, ent, lse,
        n, vocab, rpb, sb, st, 1.0 / temperature,
        BLOCK_V=block, WITH_ENTROPY=bool(with_entropy), ACC=acc_tl, num_warps=warps,
    )
    return logp, ent, lse


def token_logprobs_bwd(logits, labels, mask, logp, ent, lse, grad_logp, grad_entropy, temperature: float,
                       with_entropy: bool, out):
    """Writes dL/dlogits into ``out`` (logits' shape and dtype; may be ``logits`` itself) and returns it."""
    n, vocab, rpb, sb, st = row_geometry(logits)
    _, _, _, gsb, gst = row_geometry(out)
    if n == 0:
        return out
    acc_tl, _ = _acc(logits)
    block, warps = _config(vocab)
    grid = (min(n, MAX_GRID),)
    bf16 = out.dtype == torch.bfloat16
    _token_logprobs_bwd_kernel[grid](
        logits, labels, mask.view(torch.uint8), logp, ent, lse, grad_logp, grad_entropy,
        out.view(torch.int16) if bf16 else out,
        n, vocab, rpb, sb, st, gsb, gst, 1.0 / temperature,
        BLOCK_V=block, WITH_ENTROPY=bool(with_entropy), ACC=acc_tl, BF16_BITS=bf16, num_warps=warps,
    )
    return out
