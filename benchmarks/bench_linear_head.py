"""The fused linear head (SPEC 2 from hidden states, SPEC 7 fused loss): forward + backward.

Two ops, each returning the loss (or log-probs) and the gradients of hidden and weight:

* ``linear_steppo_loss``: the StepPO loss (step ratio, ``seq-mean-token-mean``, clip 0.2) from
  hidden states. Rows are steps, so it is the same loss as Liger's fused linear GRPO loss with
  ``importance_sampling_level="sequence"`` and ``loss_type="grpo"`` (GSPO), which is the peer
  (with ``compiled=False`` on the CPU: compiling its loss math took seconds there and left its
  time unchanged, 1323 against 1318 ms at N = 2048, H = 512, V = 32000).
  Also: eager (materialised fp32 logits, log_softmax + gather, the reference loss, autograd),
  verl's chunked ``FusedLinearForPPO`` (torch backend) followed by the reference loss, and
  steppo_fast's primitive followed by the loss.
* ``linear_token_logprobs``: log-probs and entropies (SPEC 2), backward of sum(logp + H).
  Peers: eager, verl's ``FusedLinearForPPO`` and, on CUDA, verl's Triton
  ``linear_cross_entropy``. (Liger's chunked log-prob has no entropy output, so it is not
  comparable here; its fused loss is the peer of the first op.)

TFLOP/s counts 6 N H V flops (one product forward, two backward) for every variant, over the
N tokens of the batch; cases marked agent=1.0 have every token an agent token, so no variant
skips work there. Where only a share of tokens are agent tokens, steppo_fast multiplies only
those (the peers multiply all). extra_MiB is the peak beyond the gradients of hidden and
weight a variant must return. The fp64 oracle runs chunk by chunk on the inputs' device
(materialised logits of 512 tokens at a time); the behaviour log-probs of the batch are drawn
near the current ones, computed in float32 chunks on the device.
"""

from __future__ import annotations

from typing import Iterator

import torch

import steppo_fast as sf
from steppo_fast import reference as ref

from .harness import Case, Variant


def make_batch(n_tok: int, hidden: int, vocab: int, dtype, device: str, agent: float, tokens_per_step: int = 256,
               logits_bytes: int = 256 << 20):
    """Step rows: B = n_tok / T rows of T tokens, each row one step whose first ``agent`` share of
    tokens (at least one) are agent tokens. Drawn on the device in the input dtype; the behaviour
    log-probs take at most ``logits_bytes`` of float32 logits at a time."""
    g = torch.Generator(device=device).manual_seed(0)
    T = min(tokens_per_step, n_tok)
    B = n_tok // T
    to = dict(device=device)
    h = torch.randn(B, T, hidden, generator=g, **to).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, **to) * (2.0 / hidden ** 0.5)).to(dtype)
    y = torch.randint(0, vocab, (B, T), generator=g, **to)
    lengths = torch.full((B,), max(1, int(round(agent * T))), **to)
    mask = torch.arange(T, **to)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, **to)
    # Behaviour log-probs near the current ones, so some steps clip.
    old = (_current_logp(h.reshape(-1, hidden), w, y.reshape(-1), logits_bytes).reshape(B, T)
           + 0.05 * torch.randn(B, T, generator=g, **to))
    rows = torch.arange(B, **to)
    lay = sf.StepLayout.from_step_rows(mask, rows, torch.zeros_like(rows))
    return {"h": h, "w": w, "y": y, "mask": mask, "maskf": mask.float(), "adv_row": adv,
            "adv": adv[:, None].expand(B, T).contiguous(), "old": old, "layout": lay, "B": B, "T": T}


def _current_logp(h, w, y, logits_bytes: int = 256 << 20):
    """(N,) float32 log-probs of the labels under h W^T, chunk by chunk on the device, in float32
    (at most ``logits_bytes`` of logits at a time; never an N x V or float64 copy)."""
    wf = w.float()
    rows = max(1, logits_bytes // (4 * w.shape[0]))
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for i in range(0, h.shape[0], rows):
            z = h[i:i + rows].float() @ wf.t()
            out[i:i + rows] = torch.log_softmax(z, -1).gather(-1, y[i:i + rows, None]).squeeze(-1)
    return out


def _leaves(s):
    return s["h"].detach().requires_grad_(True), s["w"].detach().requires_grad_(True)


def _loss_of_logp(s, logp):
    loss, _ = sf.policy_loss(logp.reshape(s["B"], s["T"]), s["old"], s["adv"], s["layout"], ratio_level="step",
                             agg_mode="seq-mean-token-mean", backend="reference")
    return loss


# ------------------------------------------------------------------ loss variants
def _loss_eager(s):
    h, w = _leaves(s)
    z = (h.reshape(-1, h.shape[-1]) @ w.t()).float()
    logp = torch.log_softmax(z, -1).gather(-1, s["y"].reshape(-1, 1)).squeeze(-1)
    loss = _loss_of_logp(s, logp)
    return (loss.detach(),) + torch.autograd.grad(loss, [h, w])


def _loss_liger(compiled: bool):
    module = []  # built on first use: without Liger installed only this row reports the import error

    def run(s):
        if not module:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            module.append(LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False,
                                                   loss_type="grpo", importance_sampling_level="sequence"))
        h, w = _leaves(s)
        loss, _ = module[0](h, w, s["y"], s["maskf"], s["adv_row"], old_per_token_logps=s["old"])
        return (loss.detach(),) + torch.autograd.grad(loss, [h, w])
    return run


def _loss_verl(s):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    h, w = _leaves(s)
    logp, _ = FusedLinearForPPO(chunk_size=512)(h, w, s["y"], 1.0)
    loss = _loss_of_logp(s, logp)
    return (loss.detach(),) + torch.autograd.grad(loss, [h, w])


def _loss_primitive(s):
    h, w = _leaves(s)
    logp, _ = sf.linear_token_logprobs(h, w, s["y"], s["layout"], with_entropy=False, validate=False)
    loss = _loss_of_logp(s, logp)
    return (loss.detach(),) + torch.autograd.grad(loss, [h, w])


def _loss_fused(with_entropy: bool):
    def run(s):
        h, w = _leaves(s)
        loss, _ = sf.linear_steppo_loss(h, w, s["y"], s["layout"], s["old"], s["adv"], with_entropy=with_entropy,
                                        validate=False)
        return (loss.detach(),) + torch.autograd.grad(loss, [h, w])
    return run


def _loss_oracle(s, rows_per_chunk: int = 512):
    """fp64: log-probs chunk by chunk, closed-form loss gradients, then dL/dz chunk by chunk."""
    H = s["h"].shape[-1]
    h, w = s["h"].reshape(-1, H).double(), s["w"].double()
    y, lay = s["y"].reshape(-1), s["layout"]
    n = h.shape[0]
    logp = torch.zeros(n, dtype=torch.float64, device=h.device)
    m = lay.token_mask
    for i in range(0, n, rows_per_chunk):
        sl = slice(i, i + rows_per_chunk)
        logp[sl], _ = ref.token_logprobs(h[sl] @ w.t(), y[sl], m[sl])
    args = (logp, s["old"].reshape(-1).double(), s["adv"].reshape(-1).double(), lay.token_step, lay.num_steps,
            "step")
    loss, _ = ref.policy_loss(*args)
    g_lp, _ = ref.policy_loss_grads(*args)
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    for i in range(0, n, rows_per_chunk):
        sl = slice(i, i + rows_per_chunk)
        g = ref.token_logprobs_backward(h[sl] @ w.t(), y[sl], m[sl], g_lp[sl], None)
        gh[sl] = g @ w
        gw += g.t() @ h[sl]
    return loss, gh.reshape(s["h"].shape), gw


# ------------------------------------------------------------------ log-prob variants
def _lp_eager(s):
    h, w = _leaves(s)
    z = (h.reshape(-1, h.shape[-1]) @ w.t()).float()
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, s["y"].reshape(-1, 1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    mf = s["maskf"].reshape(-1)
    return _lp_grads(h, w, logp * mf, ent * mf)


def _lp_grads(h, w, logp, ent):
    grads = torch.autograd.grad(logp.sum() + ent.sum(), [h, w])
    return (logp.detach().reshape(-1), ent.detach().reshape(-1)) + grads


def _lp_verl(s):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    h, w = _leaves(s)
    logp, ent = FusedLinearForPPO(chunk_size=512)(h, w, s["y"], 1.0)
    mf = s["maskf"]
    return _lp_grads(h, w, logp * mf, ent.float() * mf)


def _lp_verl_triton(s):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    h, w = _leaves(s)
    H = h.shape[-1]
    logp, ent = linear_cross_entropy(h.reshape(-1, H), w, s["y"].reshape(-1), 1.0, "none")
    mf = s["maskf"].reshape(-1)
    return _lp_grads(h, w, logp * mf, ent.float() * mf)


def _lp_steppo(s):
    h, w = _leaves(s)
    logp, ent = sf.linear_token_logprobs(h, w, s["y"], s["layout"], validate=False)
    return _lp_grads(h, w, logp, ent)


def _lp_oracle(s, rows_per_chunk: int = 512):
    H = s["h"].shape[-1]
    h, w = s["h"].reshape(-1, H).double(), s["w"].double()
    y, m = s["y"].reshape(-1), s["layout"].token_mask
    logps, ents = [], []
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    for i in range(0, h.shape[0], rows_per_chunk):
        sl = slice(i, i + rows_per_chunk)
        z = h[sl] @ w.t()
        lp, ent = ref.token_logprobs(z, y[sl], m[sl])
        ones = torch.ones_like(lp)
        g = ref.token_logprobs_backward(z, y[sl], m[sl], ones, ones)
        gh[sl] = g @ w
        gw += g.t() @ h[sl]
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents), gh.reshape(s["h"].shape), gw


def _shapes(device: str, grid: str):
    """(tokens, hidden, vocab, dtype, share of agent tokens, tokens per step), the headline size first."""
    if device == "cuda":
        if grid == "tiny":
            return [(1024, 256, 4096, torch.bfloat16, 1.0, 256)]
        if grid == "quick":
            return [(4096, 4096, 151936, torch.bfloat16, 1.0, 256)]
        return [(16384, 4096, 151936, torch.bfloat16, 1.0, 256), (16384, 4096, 151936, torch.bfloat16, 0.6, 256),
                (65536, 4096, 151936, torch.bfloat16, 1.0, 256)]
    if grid == "tiny":
        return [(64, 32, 500, torch.float32, 0.6, 16)]
    if grid == "quick":
        return [(512, 256, 32000, torch.float32, 1.0, 256)]
    return [(2048, 512, 32000, torch.float32, 1.0, 256), (2048, 512, 32000, torch.float32, 0.6, 256),
            (2048, 512, 151936, torch.float32, 1.0, 256)]


def cases(device: str, grid: str) -> Iterator[Case]:
    """The fused loss and the log-prob primitive per size, built when their turn comes."""
    for n, hdim, v, dt, agent, per_step in _shapes(device, grid):
        s = make_batch(n, hdim, v, dt, device, agent, per_step)
        size = {"N": n, "H": hdim, "V": v, "dtype": str(dt).replace("torch.", ""), "agent": agent}
        grads_bytes = (n * hdim + v * hdim) * s["h"].element_size()
        flops = 6.0 * n * hdim * v
        big = n * v >= (1 << 31)  # materialised logits over 2^31 entries: leave the eager rows out
        loss_variants = [] if big else [Variant("eager", _loss_eager, "peer", required_bytes=grads_bytes)]
        loss_variants += [
            Variant("liger fused linear GRPO (GSPO)", _loss_liger(device == "cuda"), "peer",
                    required_bytes=grads_bytes, requires=("liger_kernel",)),
            Variant("verl FusedLinearForPPO + loss", _loss_verl, "peer", required_bytes=grads_bytes,
                    requires=("verl",)),
            Variant("steppo_fast primitive + loss", _loss_primitive, required_bytes=grads_bytes),
            Variant("steppo_fast fused loss", _loss_fused(True), required_bytes=grads_bytes),
            Variant("steppo_fast fused loss, no entropy", _loss_fused(False), required_bytes=grads_bytes),
        ]
        yield Case("linear_steppo_loss fwd+bwd", size, s, _loss_oracle, flops=flops, variants=loss_variants)

        lp_variants = [] if big else [Variant("eager", _lp_eager, "peer", required_bytes=grads_bytes)]
        lp_variants += [
            Variant("verl FusedLinearForPPO", _lp_verl, "peer", required_bytes=grads_bytes, requires=("verl",)),
        ]
        if device == "cuda":
            lp_variants.append(Variant("verl linear_cross_entropy", _lp_verl_triton, "peer",
                                       required_bytes=grads_bytes, requires=("verl",)))
        lp_variants.append(Variant("steppo_fast", _lp_steppo, required_bytes=grads_bytes))
        yield Case("linear_token_logprobs fwd+bwd", size, s, _lp_oracle, flops=flops, variants=lp_variants)
        del s
