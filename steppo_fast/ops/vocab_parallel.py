"""SPEC 2 and 7 with the vocabulary split over a process group (tensor parallelism).

``steppo_fast::vocab_parallel_token_logprobs`` (logits (N, V_r) per rank),
``steppo_fast::vocab_parallel_linear_token_logprobs`` and
``steppo_fast::vocab_parallel_linear_policy_loss`` (weight (V_r, H) per rank, hidden replicated),
each with its backward. The algorithm is ``steppo_fast.tensor_parallel`` on the chunked sweeps of
``steppo_fast.linear_head``; the shard kernels are those of the backend the matching local op
resolves to (``token_logprobs`` / ``linear_token_logprobs`` / ``linear_policy_loss``: C++ on the
CPU, Triton on a GPU, or the reference).

The group travels as its name (``ProcessGroup.group_name``) with the shard layout as two int
lists, ``vocab_starts`` and ``vocab_sizes``, in group-rank order; the fronts in
``steppo_fast.vocab_parallel`` build them after checking, with one small collective, that every
rank agrees. These ops hold the only collectives inside steppo_fast ops: one all-gather of three
float64 per token per chunk in the forwards, and, when asked, one all-reduce of grad_hidden.
They are not entries of the backend table (``ops.registered_ops``): a collective needs every
rank of the group, so they are checked by the multi-process tests.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import tensor_parallel as tp
from ._registry import _acc, _opt_float, resolve_backend
from .linear_head import _linear_grads_fake
from .losses import POLICY_METRICS, _policy_loss


def _shards(vocab_starts: List[int], vocab_sizes: List[int], group_name: str) -> tp.VocabShards:
    return tp.VocabShards.from_op_args(group_name, vocab_starts, vocab_sizes)


def _epilogue(op: str, device, backend: str, shards: tp.VocabShards) -> tp.ShardEpilogue:
    return tp.ShardEpilogue(resolve_backend(op, device, backend), shards)


# ------------------------------------------------------------------ from sharded logits
@torch.library.custom_op("steppo_fast::vocab_parallel_token_logprobs", mutates_args=())
def _vp_token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                       inplace_backward: bool, vocab_starts: List[int], vocab_sizes: List[int], group_name: str,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    shards = _shards(vocab_starts, vocab_sizes, group_name)
    return _epilogue("token_logprobs", logits.device, backend, shards).forward(logits, labels, mask, temperature,
                                                                                with_entropy)


@_vp_token_logprobs.register_fake
def _(logits, labels, mask, temperature, with_entropy, inplace_backward, vocab_starts, vocab_sizes, group_name,
      backend):
    n = labels.shape[0]
    dt = _acc(logits)
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=torch.float64)


def _vp_backward_impl(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy,
                      vocab_starts, vocab_sizes, group_name, backend, out):
    shards = _shards(vocab_starts, vocab_sizes, group_name)
    ep = _epilogue("token_logprobs", logits.device, backend, shards)
    dt = logp.dtype
    ep.backward(logits, labels, mask, logp.contiguous(), entropy.contiguous(), lse.contiguous(),
                grad_logp.to(dt).contiguous(), grad_entropy.to(dt).contiguous(), temperature, with_entropy, out)


@torch.library.custom_op("steppo_fast::vocab_parallel_token_logprobs_backward", mutates_args=())
def _vp_token_logprobs_backward(logits: Tensor, labels: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
                                lse: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                                with_entropy: bool, vocab_starts: List[int], vocab_sizes: List[int], group_name: str,
                                backend: str) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _vp_backward_impl(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy,
                      vocab_starts, vocab_sizes, group_name, backend, out)
    return out


@_vp_token_logprobs_backward.register_fake
def _(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, vocab_starts,
      vocab_sizes, group_name, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("steppo_fast::vocab_parallel_token_logprobs_backward_", mutates_args=("logits",))
def _vp_token_logprobs_backward_(logits: Tensor, labels: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
                                 lse: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                                 with_entropy: bool, vocab_starts: List[int], vocab_sizes: List[int], group_name: str,
                                 backend: str) -> None:
    _vp_backward_impl(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy,
                      vocab_starts, vocab_sizes, group_name, backend, logits)


@_vp_token_logprobs_backward_.register_fake
def _(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, vocab_starts,
      vocab_sizes, group_name, backend):
    return None


def _vptl_setup(ctx, inputs, output):
    (logits, labels, mask, temperature, with_entropy, inplace_backward, vocab_starts, vocab_sizes, group_name,
     backend) = inputs
    logp, ent, lse = output
    ctx.save_for_backward(logits, labels, mask, logp, ent, lse)
    ctx.opts = (temperature, with_entropy, vocab_starts, vocab_sizes, group_name, backend)
    ctx.inplace = inplace_backward


def _vptl_backward(ctx, g_logp, g_ent, g_lse):
    logits, labels, mask, logp, ent, lse = ctx.saved_tensors
    temperature, with_entropy = ctx.opts[:2]
    g_logp = g_logp if g_logp is not None else torch.zeros_like(logp)
    g_ent = g_ent if g_ent is not None and with_entropy else torch.zeros_like(ent)
    args = (labels, mask, logp, ent, lse, g_logp, g_ent, *ctx.opts)
    if ctx.inplace:
        _vp_token_logprobs_backward_(logits, *args)
        grad = logits
    else:
        grad = _vp_token_logprobs_backward(logits, *args)
    return (grad,) + (None,) * 9


_vp_token_logprobs.register_autograd(_vptl_backward, setup_context=_vptl_setup)


def token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                   inplace_backward: bool, shards: tp.VocabShards, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) over the whole vocabulary from this rank's logits shard (SPEC 2).

    logits: (N, V_r) or (B, T, V_r), the columns ``[shards.start, shards.start + V_r)``; labels (N,)
    global vocabulary ids; mask (N,) bool. Returns two (N,) tensors, the same on every rank.
    Differentiable in logits (no communication in the backward: each rank gets its columns).
    """
    logp, ent, _ = _vp_token_logprobs(logits, labels, mask, float(temperature), bool(with_entropy),
                                      bool(inplace_backward), list(shards.starts), list(shards.sizes),
                                      shards.group.group_name, backend)
    return logp, ent


# ------------------------------------------------------------------ from hidden states
@torch.library.custom_op("steppo_fast::vocab_parallel_linear_token_logprobs", mutates_args=())
def _vp_linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                              rows: Optional[Tensor], temperature: float, with_entropy: bool, chunk: int,
                              fp32_weight_grad: bool, reduce_grad_hidden: bool, vocab_starts: List[int],
                              vocab_sizes: List[int], group_name: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    from .. import linear_head

    shards = _shards(vocab_starts, vocab_sizes, group_name)
    ep = _epilogue("linear_token_logprobs", hidden.device, backend, shards)
    return linear_head.forward_stats(ep, hidden, weight, bias, labels, rows, temperature, with_entropy, chunk)


@_vp_linear_token_logprobs.register_fake
def _(hidden, weight, bias, labels, rows, temperature, with_entropy, chunk, fp32_weight_grad, reduce_grad_hidden,
      vocab_starts, vocab_sizes, group_name, backend):
    dt = _acc(hidden, weight, bias)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=torch.float64)


@torch.library.custom_op("steppo_fast::vocab_parallel_linear_token_logprobs_backward", mutates_args=())
def _vp_linear_token_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                       rows: Optional[Tensor], logp: Tensor, entropy: Tensor, lse: Tensor,
                                       grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                                       with_entropy: bool, chunk: int, need_hidden: bool, need_weight: bool,
                                       need_bias: bool, fp32_weight_grad: bool, reduce_grad_hidden: bool,
                                       vocab_starts: List[int], vocab_sizes: List[int], group_name: str,
                                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    from .. import linear_head

    shards = _shards(vocab_starts, vocab_sizes, group_name)
    ep = _epilogue("linear_token_logprobs", hidden.device, backend, shards)
    gh, gw, gb = linear_head.backward_grads(ep, hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp,
                                            grad_entropy, temperature, with_entropy, chunk, need_hidden, need_weight,
                                            need_bias, fp32_weight_grad)
    if need_hidden and reduce_grad_hidden:
        tp.reduce_grad_hidden(gh, shards)
    return gh, gw, gb


@_vp_linear_token_logprobs_backward.register_fake
def _(hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy,
      chunk, need_hidden, need_weight, need_bias, fp32_weight_grad, reduce_grad_hidden, vocab_starts, vocab_sizes,
      group_name, backend):
    return _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _vpltl_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, rows, temperature, with_entropy, chunk, fp32_weight_grad, reduce_grad_hidden,
     vocab_starts, vocab_sizes, group_name, backend) = inputs
    logp, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, rows, logp, ent, lse)
    ctx.opts = (temperature, with_entropy, chunk)
    ctx.tail = (fp32_weight_grad, reduce_grad_hidden, vocab_starts, vocab_sizes, group_name, backend)


def _vpltl_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, labels, rows, logp, ent, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    g_logp = g_logp if g_logp is not None else torch.zeros_like(logp)
    g_ent = g_ent if g_ent is not None else torch.zeros_like(ent)
    gh, gw, gb = _vp_linear_token_logprobs_backward(hidden, weight, bias, labels, rows, logp, ent, lse, g_logp, g_ent,
                                                    *ctx.opts, need_h, need_w, need_b, *ctx.tail)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 11


_vp_linear_token_logprobs.register_autograd(_vpltl_backward, setup_context=_vpltl_setup)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, rows: Optional[Tensor], temperature: float,
                          bias: Optional[Tensor], with_entropy: bool, chunk: int, fp32_weight_grad: bool,
                          reduce_grad_hidden: bool, shards: tp.VocabShards,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) from hidden (N, H), replicated over the group, and this rank's weight shard
    (V_r, H) (+ bias shard (V_r,)); rows (M,) int64 or None as in ``ops.linear_token_logprobs``;
    chunk > 0 (the same on every rank). Differentiable in hidden, weight and bias: grad_weight and
    grad_bias are this rank's shards, grad_hidden this rank's part unless ``reduce_grad_hidden``
    (then the sum over the group, the same on every rank)."""
    logp, ent, _ = _vp_linear_token_logprobs(hidden, weight, bias, labels, rows, float(temperature),
                                             bool(with_entropy), int(chunk), bool(fp32_weight_grad),
                                             bool(reduce_grad_hidden), list(shards.starts), list(shards.sizes),
                                             shards.group.group_name, backend)
    return logp, ent


# ------------------------------------------------------------------ the fused loss
@torch.library.custom_op("steppo_fast::vocab_parallel_linear_policy_loss", mutates_args=())
def _vp_linear_policy_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
                           token_step: Tensor, step_offsets: Tensor, num_steps: int, bounds: List[int],
                           split_step: List[int], old_logp: Tensor, advantages: Tensor, weights: Optional[Tensor],
                           ref_logp: Optional[Tensor], ratio_level: str, clip_low: float, clip_high: float,
                           dual_clip: Optional[float], agg_mode: str, entropy_coef: float, kl_coef: float,
                           kl_type: str, global_num_tokens: Optional[float], global_num_steps: Optional[float],
                           norm_constant: Optional[float], temperature: float, with_entropy: bool, need_hidden: bool,
                           need_weight: bool, need_bias: bool, fp32_weight_grad: bool, reduce_grad_hidden: bool,
                           vocab_starts: List[int], vocab_sizes: List[int], group_name: str,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .. import linear_head

    shards = _shards(vocab_starts, vocab_sizes, group_name)
    ep = _epilogue("linear_policy_loss", hidden.device, backend, shards)
    loss_args = dict(ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                     agg_mode=agg_mode, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_type=kl_type,
                     global_num_tokens=global_num_tokens, global_num_steps=global_num_steps,
                     norm_constant=norm_constant)
    lp, ent, gh, gw, gb = linear_head.policy_loss_and_grads(
        ep, hidden, weight, bias, labels, rows, token_step, num_steps, step_offsets, bounds, split_step, old_logp,
        advantages, weights, ref_logp, loss_args, temperature, with_entropy, need_hidden, need_weight, need_bias,
        fp32_weight_grad)
    if need_hidden and reduce_grad_hidden:
        tp.reduce_grad_hidden(gh, shards)
    # The log-probs are those of the whole vocabulary and the same on every rank, so are the loss
    # and the metrics (the registry's policy loss, as in the unsharded op).
    loss, metrics, _, _ = _policy_loss(lp, old_logp, advantages, token_step, weights, ent if with_entropy else None,
                                       ref_logp, num_steps, ratio_level, clip_low, clip_high, dual_clip, agg_mode,
                                       entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps,
                                       norm_constant, "auto")
    return loss, metrics, lp, ent, gh, gw, gb


@_vp_linear_policy_loss.register_fake
def _(hidden, weight, bias, labels, rows, token_step, step_offsets, num_steps, bounds, split_step, old_logp,
      advantages, weights, ref_logp, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef,
      kl_type, global_num_tokens, global_num_steps, norm_constant, temperature, with_entropy, need_hidden, need_weight,
      need_bias, fp32_weight_grad, reduce_grad_hidden, vocab_starts, vocab_sizes, group_name, backend):
    dt = _acc(hidden, weight, bias)
    m = rows.shape[0]
    gh, gw, gb = _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(len(POLICY_METRICS), dtype=dt),
            hidden.new_empty(m, dtype=dt), hidden.new_empty(m, dtype=dt), gh, gw, gb)


def _vplpl_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.n_inputs = len(inputs)
    ctx.needs = inputs[27:30]  # need_hidden, need_weight, need_bias


def _vplpl_backward(ctx, g_loss, g_metrics, g_lp, g_ent, g_gh, g_gw, g_gb):
    # As the unsharded fused loss: the gradients were computed (and grad_hidden summed) in the
    # forward; the backward scales them, in place in eager mode. An empty shard (V < group size)
    # gets an empty gradient, not None.
    gh, gw, gb = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    for i, g in ((0, gh), (1, gw), (2, gb)):
        if ctx.needs[i]:
            s = g_loss.to(g.dtype)
            grads[i] = g.mul_(s) if type(g) is torch.Tensor and type(s) is torch.Tensor else g * s
    return tuple(grads)


_vp_linear_policy_loss.register_autograd(_vplpl_backward, setup_context=_vplpl_setup)


def linear_policy_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
                       token_step: Tensor, step_offsets: Tensor, num_steps: int, bounds: List[int],
                       split_step: List[int], old_logp: Tensor, advantages: Tensor, weights: Optional[Tensor],
                       ref_logp: Optional[Tensor], loss_args: Dict, temperature: float, with_entropy: bool,
                       need_hidden: bool, need_weight: bool, need_bias: bool, fp32_weight_grad: bool,
                       reduce_grad_hidden: bool, shards: tp.VocabShards,
                       backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """The fused policy loss (``ops.linear_policy_loss``) with this rank's weight shard (V_r, H).

    Arguments as ``ops.linear_policy_loss`` (loss_args: ratio_level, clip_low, clip_high, dual_clip,
    agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps, norm_constant);
    every rank passes the same hidden states, tokens, layout and options. Returns (loss, metrics),
    the same on every rank; grad_weight / grad_bias are this rank's shards, grad_hidden summed over
    the group when ``reduce_grad_hidden``.
    """
    a = loss_args
    loss, m, _, _, _, _, _ = _vp_linear_policy_loss(
        hidden, weight, bias, labels, rows, token_step, step_offsets, int(num_steps), [int(b) for b in bounds],
        [int(s) for s in split_step], old_logp, advantages, weights, ref_logp, a["ratio_level"],
        float(a["clip_low"]), float(a["clip_high"]), None if a["dual_clip"] is None else float(a["dual_clip"]),
        a["agg_mode"], float(a["entropy_coef"]), float(a["kl_coef"]), a["kl_type"],
        _opt_float(a["global_num_tokens"]), _opt_float(a["global_num_steps"]), _opt_float(a["norm_constant"]),
        float(temperature), bool(with_entropy), bool(need_hidden), bool(need_weight), bool(need_bias),
        bool(fp32_weight_grad), bool(reduce_grad_hidden), list(shards.starts), list(shards.sizes),
        shards.group.group_name, backend)
    return loss, dict(zip(POLICY_METRICS, m.detach().unbind(0)))
