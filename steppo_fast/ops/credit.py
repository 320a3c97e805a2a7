"""SPEC 3-6: credit assignment (step rewards, broadcast, step and token GAE, whitening, group advantages).

Each op has the reference, a C++ kernel (``_C``) and a CUDA kernel (``_C_cuda``); ``step_rewards``
also a Triton kernel (``kernels/step_rewards.py``).

Every kernel checks the index and offset values it reads against the sizes it is given. The C++
kernels raise ValueError naming the first bad one; the GPU kernels, which cannot raise without
waiting for the device, skip it, write NaN where it would have gone and report it in error words
on the device (``_guards``: ``index_errors``, ``check_index_errors``, STEPPO_FAST_SYNC_INDEX_CHECKS).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from .. import reference as ref
from . import _guards as guard
from ._registry import _IMPLS, _acc, _run, register_backend


@torch.library.custom_op("steppo_fast::step_rewards", mutates_args=())
def _step_rewards(token_rewards: Tensor, token_step: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
                  backend: str) -> Tensor:
    op = "step_rewards"
    guard.tensor(op, "token_rewards", token_rewards, "float", dim=1)
    guard.tensor(op, "token_step", token_step, "int", like=token_rewards, like_name="token_rewards")
    guard.tensor(op, "step_tokens", step_tokens, "int", dim=1, device=token_rewards.device)
    _check_offsets(op, "step_token_offsets", step_token_offsets, token_rewards.device)
    return _run("step_rewards", token_rewards.device, backend, token_rewards, token_step, step_tokens,
                step_token_offsets)


@_step_rewards.register_fake
def _(token_rewards, token_step, step_tokens, step_token_offsets, backend):
    return token_rewards.new_empty(step_token_offsets.shape[0] - 1, dtype=_acc(token_rewards))


@register_backend("step_rewards", "reference")
def _step_rewards_ref(token_rewards, token_step, step_tokens, step_token_offsets):
    return ref.step_rewards(token_rewards, token_step, step_token_offsets.numel() - 1)


@register_backend("step_rewards", "cpp")
def _step_rewards_cpp(token_rewards, token_step, step_tokens, step_token_offsets):
    mod = _native.cpu_module()
    out = torch.empty(step_token_offsets.numel() - 1, dtype=_acc(token_rewards))
    r = token_rewards.contiguous()
    tok = _native_index(step_tokens, torch.int64)
    off = _native_index(step_token_offsets, torch.int64)
    mod.step_rewards_cpu(
        _native.ptr("token_rewards", r), _native.dtype_code("token_rewards", r), r.numel(),
        _native.ptr("step_tokens", tok, torch.int64), tok.numel(),
        _native.ptr("step_token_offsets", off, torch.int64),
        out.numel(), out.data_ptr(), _native.dtype_code("out", out),
    )
    return out


@register_backend("step_rewards", "cuda")
def _step_rewards_cuda(token_rewards, token_step, step_tokens, step_token_offsets):
    mod = _native.cuda_module()
    out = torch.empty(step_token_offsets.numel() - 1, dtype=_acc(token_rewards), device=token_rewards.device)
    r = token_rewards.contiguous()
    _checked("step_rewards", r.device, (token_rewards, token_step, step_tokens, step_token_offsets),
             lambda err: mod.step_rewards_cuda(
                 _native.ptr("token_rewards", r), _native.dtype_code("token_rewards", r), r.numel(),
                 _native.ptr("step_tokens", step_tokens, torch.int64), step_tokens.numel(),
                 _native.ptr("step_token_offsets", step_token_offsets, torch.int64),
                 out.numel(), out.data_ptr(), _native.dtype_code("out", out), err.data_ptr(), *_on_device(r)))
    return out


@register_backend("step_rewards", "triton")
def _step_rewards_triton(token_rewards, token_step, step_tokens, step_token_offsets):
    from ..kernels import step_rewards as k

    return _checked("step_rewards", token_rewards.device, (token_rewards, token_step, step_tokens, step_token_offsets),
                    lambda err: k.step_rewards(token_rewards.contiguous(), step_tokens.contiguous(),
                                               step_token_offsets.contiguous(), err))


def step_rewards(token_rewards: Tensor, token_step: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
                 backend: str = "auto") -> Tensor:
    """r_s = sum of the token rewards of step s's agent tokens (SPEC 3).

    Args:
        token_rewards: (N,) float; token_step: (N,) int32 step id or -1;
        step_tokens, step_token_offsets: the layout's CSR token list (int64): step s's tokens are
            ``step_tokens[step_token_offsets[s]:step_token_offsets[s + 1]]``, each in [0, N).
    Returns:
        (S,) float32 (float64 for float64 rewards), S = ``step_token_offsets.numel() - 1``.
    Raises ValueError for a bad size; on the CPU kernel also for an index or offset out of range.
    On a GPU a step with an offset pair out of order or out of range, or a token index outside
    [0, N), gets NaN and is reported in the device's error words (``ops.check_index_errors``).
    """
    return _step_rewards(token_rewards, token_step, step_tokens, step_token_offsets, backend)


@torch.library.custom_op("steppo_fast::broadcast_to_tokens", mutates_args=())
def _broadcast_to_tokens(step_values: Tensor, token_step: Tensor, backend: str) -> Tensor:
    op = "broadcast_to_tokens"
    guard.tensor(op, "step_values", step_values, "float", dim=1)
    guard.tensor(op, "token_step", token_step, "int", dim=1, device=step_values.device)
    return _run("broadcast_to_tokens", step_values.device, backend, step_values, token_step)


@_broadcast_to_tokens.register_fake
def _(step_values, token_step, backend):
    return step_values.new_empty(token_step.shape)


register_backend("broadcast_to_tokens", "reference")(ref.broadcast_to_tokens)


def _native_float(name: str, t: Tensor) -> Tensor:
    """A contiguous float tensor the C++ kernels read, with its dtype checked."""
    t = t.contiguous()
    _native.dtype_code(name, t)
    return t


def _native_index(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def _check_offsets(op: str, name: str, t, device) -> Tensor:
    """CSR offsets: a 1-D integer tensor with at least one entry (their values are checked by the
    kernels that read them)."""
    guard.tensor(op, name, t, "int", dim=1, device=device)
    if t.numel() < 1:
        raise ValueError(f"{op}: {name} must hold at least one offset (CSR offsets start with 0)")
    return t


def _on_device(t: Tensor):
    """(stream, device index) arguments of a _C_cuda call for tensors on t's device."""
    return _native.cuda_stream(t), t.device.index or 0


def _on_cpu(op: str, inputs):
    """A callable that reruns ``op``'s C++ kernel on CPU copies of ``inputs`` (the op's impl
    arguments), whose ValueError names a bad index exactly; nothing when _C is not built."""
    def run():
        if _native.cpu_module() is not None:
            _IMPLS[op]["cpp"](*(x.cpu() if isinstance(x, Tensor) else x for x in inputs))
    return run


def _checked(op: str, device: torch.device, inputs, call):
    """Runs ``call(err)`` for a GPU kernel of ``op`` that reports bad indices in the error words
    ``err`` (a device int64 tensor, one word per argument of ``_guards.INDEX_ARGS[op]``), and in
    the sync mode checks them at once."""
    words, sync = guard.index_words(op, device)
    out = call(words)
    if sync:
        guard.check_call(op, words, _on_cpu(op, inputs))
    return out


def _launch(kind: str, name: str, like: Tensor, *args, inputs=()):
    """Calls kernel ``name`` of _C (kind "cpp": ``name_cpu``) or _C_cuda (kind "cuda":
    ``name_cuda``, with the stream and device of ``like`` appended). Both take the same arguments;
    the CUDA kernels of the ops in ``_guards.INDEX_ARGS`` also take their error words, before the
    stream (``inputs``: the op's impl arguments, for the sync mode's message)."""
    if kind == "cpp":
        return getattr(_native.cpu_module(), f"{name}_cpu")(*args)
    fn = getattr(_native.cuda_module(), f"{name}_cuda")
    if name not in guard.INDEX_ARGS:
        return fn(*args, *_on_device(like))
    return _checked(name, like.device, inputs, lambda err: fn(*args, err.data_ptr(), *_on_device(like)))


def _register_native(op: str):
    """Decorator for ``factory(kind) -> impl``: registers the impl of both compiled backends."""
    def deco(factory):
        for kind in ("cpp", "cuda"):
            register_backend(op, kind)(factory(kind))
        return factory
    return deco


@_register_native("broadcast_to_tokens")
def _broadcast_to_tokens_native(kind):
    def impl(step_values, token_step):
        v = _native_float("step_values", step_values)
        ts = _native_index(token_step, torch.int32)
        out = torch.empty(ts.shape, dtype=v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32,
                          device=v.device)
        # With no steps every token_step is -1: the kernel writes zeros and reads no value.
        _launch(kind, "broadcast_to_tokens", v, v.data_ptr(), _native.dtype_code("step_values", v),
                v.numel(), ts.data_ptr(), ts.numel(), out.data_ptr(), _native.dtype_code("out", out),
                inputs=(step_values, token_step))
        return out.to(step_values.dtype)  # same dtype as the values (a copy is exact)
    return impl


def broadcast_to_tokens(step_values: Tensor, token_step: Tensor, backend: str = "auto") -> Tensor:
    """(N,) tensor: step_values[token_step[t]] on agent tokens, 0 elsewhere (SPEC 4).

    step_values: (S,) float; token_step: (N,) integer, a step id in [0, S) or negative (no step).
    An id >= S raises ValueError on the CPU kernel; on a GPU its token gets NaN and is reported in
    the device's error words (``ops.check_index_errors``)."""
    return _broadcast_to_tokens(step_values, token_step, backend)


@torch.library.custom_op("steppo_fast::step_gae", mutates_args=())
def _step_gae(step_rewards: Tensor, step_values: Tensor, traj_step_offsets: Tensor, gamma: float, lam: float,
              backend: str) -> Tuple[Tensor, Tensor]:
    op = "step_gae"
    guard.tensor(op, "step_rewards", step_rewards, "float", dim=1)
    guard.tensor(op, "step_values", step_values, "float", like=step_rewards, like_name="step_rewards")
    _check_offsets(op, "traj_step_offsets", traj_step_offsets, step_rewards.device)
    return _run("step_gae", step_rewards.device, backend, step_rewards, step_values, traj_step_offsets, gamma, lam)


@_step_gae.register_fake
def _(step_rewards, step_values, traj_step_offsets, gamma, lam, backend):
    dt = _acc(step_rewards, step_values)
    return step_rewards.new_empty(step_rewards.shape, dtype=dt), step_rewards.new_empty(step_rewards.shape, dtype=dt)


register_backend("step_gae", "reference")(ref.step_gae)


@_register_native("step_gae")
def _step_gae_native(kind):
    def impl(step_rewards, step_values, traj_step_offsets, gamma, lam):
        r, v = _native_float("step_rewards", step_rewards), _native_float("step_values", step_values)
        off = _native_index(traj_step_offsets, torch.int64)
        dt = _acc(step_rewards, step_values)
        adv, ret = torch.empty(r.shape, dtype=dt, device=r.device), torch.empty(r.shape, dtype=dt, device=r.device)
        _launch(kind, "step_gae", r, r.data_ptr(), _native.dtype_code("step_rewards", r), v.data_ptr(),
                _native.dtype_code("step_values", v), r.numel(), off.data_ptr(), off.numel() - 1,
                float(gamma), float(lam), adv.data_ptr(), ret.data_ptr(), _native.dtype_code("adv", adv),
                inputs=(step_rewards, step_values, traj_step_offsets, gamma, lam))
        return adv, ret
    return impl


def step_gae(step_rewards: Tensor, step_values: Tensor, traj_step_offsets: Tensor, gamma: float = 1.0,
             lam: float = 1.0, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Unwhitened step-level GAE (SPEC 4): (advantages, returns), each (S,).

    step_rewards, step_values: (S,) float; traj_step_offsets: (R+1,) integer CSR offsets from 0 to S
    (trajectory r's steps are ``traj_step_offsets[r]:traj_step_offsets[r + 1]``, in time order);
    gamma, lam: finite, in [0, 1]. Bad offsets raise ValueError on the CPU kernel; on a GPU the
    steps they would have covered get NaN and they are reported in the device's error words
    (``ops.check_index_errors``)."""
    gamma = guard.number("step_gae", "gamma", gamma, 0.0, 1.0)
    lam = guard.number("step_gae", "lam", lam, 0.0, 1.0)
    return _step_gae(step_rewards, step_values, traj_step_offsets, gamma, lam, backend)


@torch.library.custom_op("steppo_fast::token_gae", mutates_args=())
def _token_gae(token_rewards: Tensor, token_values: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
               traj_step_offsets: Tensor, gamma: float, lam: float, backend: str) -> Tuple[Tensor, Tensor]:
    op = "token_gae"
    guard.tensor(op, "token_rewards", token_rewards, "float", dim=1)
    guard.tensor(op, "token_values", token_values, "float", like=token_rewards, like_name="token_rewards")
    guard.tensor(op, "step_tokens", step_tokens, "int", dim=1, device=token_rewards.device)
    _check_offsets(op, "step_token_offsets", step_token_offsets, token_rewards.device)
    _check_offsets(op, "traj_step_offsets", traj_step_offsets, token_rewards.device)
    return _run("token_gae", token_rewards.device, backend, token_rewards, token_values, step_tokens,
                step_token_offsets, traj_step_offsets, gamma, lam)


@_token_gae.register_fake
def _(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets, gamma, lam, backend):
    dt = _acc(token_rewards, token_values)
    return token_rewards.new_empty(token_rewards.shape, dtype=dt), token_rewards.new_empty(token_rewards.shape,
                                                                                            dtype=dt)


register_backend("token_gae", "reference")(ref.token_gae)


@_register_native("token_gae")
def _token_gae_native(kind):
    def impl(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets, gamma, lam):
        r, v = _native_float("token_rewards", token_rewards), _native_float("token_values", token_values)
        tok = _native_index(step_tokens, torch.int64)
        soff = _native_index(step_token_offsets, torch.int64)
        toff = _native_index(traj_step_offsets, torch.int64)
        dt = _acc(token_rewards, token_values)
        adv, ret = torch.empty(r.shape, dtype=dt, device=r.device), torch.empty(r.shape, dtype=dt, device=r.device)
        _launch(kind, "token_gae", r, r.data_ptr(), _native.dtype_code("token_rewards", r), v.data_ptr(),
                _native.dtype_code("token_values", v), r.numel(), tok.data_ptr(), tok.numel(),
                soff.data_ptr(), soff.numel() - 1, toff.data_ptr(), toff.numel() - 1, float(gamma),
                float(lam), adv.data_ptr(), ret.data_ptr(), _native.dtype_code("adv", adv),
                inputs=(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets, gamma, lam))
        return adv, ret
    return impl


def token_gae(token_rewards: Tensor, token_values: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
              traj_step_offsets: Tensor, gamma: float = 1.0, lam: float = 1.0,
              backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Unwhitened token-level GAE across steps (SPEC 5): (advantages, returns), each (N,).

    token_rewards, token_values: (N,) float; step_tokens (N_active,) with entries in [0, N),
    step_token_offsets (S+1,) CSR offsets from 0 to N_active, traj_step_offsets (R+1,) CSR offsets
    from 0 to S (the layout's); gamma, lam: finite, in [0, 1]. Bad indices or offsets raise
    ValueError on the CPU kernel; on a GPU the tokens they would have filled get NaN (a bad token
    index: the trajectory's tokens before it, which depend on it) and they are reported in the
    device's error words (``ops.check_index_errors``)."""
    gamma = guard.number("token_gae", "gamma", gamma, 0.0, 1.0)
    lam = guard.number("token_gae", "lam", lam, 0.0, 1.0)
    return _token_gae(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets,
                      gamma, lam, backend)


# Whitening is split in two so that data-parallel callers can all-reduce the
# moments in between: moments -> (all-reduce) -> apply.
WHITEN_MODES = ("step", "token")


@torch.library.custom_op("steppo_fast::whiten_moments", mutates_args=())
def _whiten_moments(x: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    guard.tensor("whiten", "x", x, "float")
    guard.optional("whiten", "mask", mask, kind="mask", like=x, like_name="x")
    return _run("whiten_moments", x.device, backend, x, mask)


@_whiten_moments.register_fake
def _(x, mask, backend):
    return x.new_empty(3, dtype=torch.float64)


@register_backend("whiten_moments", "reference")
def _whiten_moments_ref(x, mask):
    xd = x.double()
    if mask is not None:
        m = mask.bool()
        xd = torch.where(m, xd, torch.zeros_like(xd))
        cnt = m.sum().double()
    else:
        cnt = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([cnt, xd.sum(), (xd * xd).sum()])


@_register_native("whiten_moments")
def _whiten_moments_native(kind):
    def impl(x, mask):
        xc = _native_float("x", x)
        m = mask.bool().contiguous() if mask is not None else None
        out = torch.empty(3, dtype=torch.float64, device=x.device)
        work, ws = (), None
        if kind == "cuda":  # per-block partial sums; ws stays referenced until the launch is queued
            ws = torch.empty(_native.cuda_module().whiten_moments_cuda_workspace(xc.numel()), dtype=torch.float64,
                             device=x.device)
            work = (ws.data_ptr(),)
        _launch(kind, "whiten_moments", xc, xc.data_ptr(), _native.dtype_code("x", xc),
                m.data_ptr() if m is not None else 0, xc.numel(), out.data_ptr(), *work)
        return out
    return impl


@torch.library.custom_op("steppo_fast::whiten_apply", mutates_args=())
def _whiten_apply(x: Tensor, mask: Optional[Tensor], moments: Tensor, mode: str, backend: str) -> Tensor:
    if mode not in WHITEN_MODES:
        raise ValueError(f"mode must be one of {WHITEN_MODES}, got {mode!r}")
    guard.tensor("whiten", "x", x, "float")
    guard.optional("whiten", "mask", mask, kind="mask", like=x, like_name="x")
    guard.tensor("whiten", "moments", moments, "float", numel=3, device=x.device)
    return _run("whiten_apply", x.device, backend, x, mask, moments, mode)


@_whiten_apply.register_fake
def _(x, mask, moments, mode, backend):
    return x.new_empty(x.shape, dtype=_acc(x))


@register_backend("whiten_apply", "reference")
def _whiten_apply_ref(x, mask, moments, mode):
    dt = _acc(x)
    n, s, ss = moments[0], moments[1], moments[2]
    mean = s / n.clamp(min=1)
    # Unbiased variance from the moments; fewer than 2 elements give 0.
    var = ((ss - s * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(n >= 2, var, torch.zeros_like(var))
    xd = x.double()
    if mode == "step":
        out = (xd - mean) / (var.sqrt() + ref.WHITEN_STEP_EPS)
    else:
        out = (xd - mean) * torch.rsqrt(var + ref.WHITEN_TOKEN_EPS)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out.to(dt)


@_register_native("whiten_apply")
def _whiten_apply_native(kind):
    def impl(x, mask, moments, mode):
        xc = _native_float("x", x)
        m = mask.bool().contiguous() if mask is not None else None
        mo = moments.to(torch.float64).contiguous()
        out = torch.empty(xc.shape, dtype=_acc(x), device=x.device)
        eps = ref.WHITEN_STEP_EPS if mode == "step" else ref.WHITEN_TOKEN_EPS
        _launch(kind, "whiten_apply", xc, xc.data_ptr(), _native.dtype_code("x", xc),
                m.data_ptr() if m is not None else 0, xc.numel(), mo.data_ptr(), 0 if mode == "step" else 1, eps,
                out.data_ptr(), _native.dtype_code("out", out))
        return out
    return impl


def whiten(x: Tensor, mask: Optional[Tensor] = None, mode: str = "step", process_group=None,
           backend: str = "auto") -> Tensor:
    """Whitening over all entries (or the masked ones), optionally across data-parallel ranks.

    ``mode="step"`` (SPEC 4): (x - mean) / (std + 1e-8). ``mode="token"`` (SPEC 5, verl's
    ``masked_whiten``): (x - mean) * rsqrt(var + 1e-8), 0 outside ``mask``. The std is
    unbiased and taken as 0 below 2 elements. With ``process_group``, one all-reduce of
    (count, sum, sum of squares) in float64 makes every rank use the global statistics.

    Args:
        x: (M,) float; mask: (M,) bool or None.
    Returns:
        (M,) float32 (float64 for float64 x).
    """
    guard.choice("whiten", "mode", mode, WHITEN_MODES)
    moments = _whiten_moments(x, mask, backend)
    if process_group is not None:
        import torch.distributed as dist

        if process_group is True:
            process_group = None  # the default group
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=process_group)
    return _whiten_apply(x, mask, moments, mode, backend)


GROUP_NORMS = ("mean_std", "mean", "rloo")
SINGLETONS = ("unit", "zero")


@torch.library.custom_op("steppo_fast::group_advantage", mutates_args=())
def _group_advantage(values: Tensor, group: Tensor, subkey: Optional[Tensor], norm: str, singleton: str,
                     eps: float, backend: str) -> Tensor:
    if norm not in GROUP_NORMS:
        raise ValueError(f"norm must be one of {GROUP_NORMS}, got {norm!r}")
    if singleton not in SINGLETONS:
        raise ValueError(f"singleton must be one of {SINGLETONS}, got {singleton!r}")
    op = "group_advantage"
    guard.tensor(op, "values", values, "float", dim=1)
    guard.tensor(op, "group", group, "int", like=values, like_name="values")
    guard.optional(op, "subkey", subkey, kind="int", like=values, like_name="values")
    return _run("group_advantage", values.device, backend, values, group, subkey, norm, singleton, eps)


@_group_advantage.register_fake
def _(values, group, subkey, norm, singleton, eps, backend):
    return values.new_empty(values.shape, dtype=_acc(values))


@register_backend("group_advantage", "reference")
def _group_advantage_ref(values, group, subkey, norm, singleton, eps):
    if values.numel() == 0:
        return values.to(_acc(values)).clone()
    keys = group.long() if subkey is None else torch.stack([group.long(), subkey.long()], 1)
    _, gid = torch.unique(keys, dim=0, return_inverse=True)
    return ref.group_normalize(values, gid, norm, singleton, eps)


@_register_native("group_advantage")
def _group_advantage_native(kind):
    def impl(values, group, subkey, norm, singleton, eps):
        v = _native_float("values", values)
        g = _native_index(group, torch.int64)
        k = _native_index(subkey, torch.int64) if subkey is not None else None
        out = torch.empty(v.shape, dtype=_acc(values), device=v.device)
        work, ws = (), None
        if kind == "cuda":  # radix-sort keys, indices and CUB temporary storage
            nbytes = _native.cuda_module().group_advantage_cuda_workspace(v.numel(), v.device.index or 0)
            ws = torch.empty(nbytes, dtype=torch.uint8, device=v.device)
            work = (ws.data_ptr(), nbytes)
        _launch(kind, "group_advantage", v, v.data_ptr(), _native.dtype_code("values", v), g.data_ptr(),
                k.data_ptr() if k is not None else 0, v.numel(), GROUP_NORMS.index(norm), SINGLETONS.index(singleton),
                float(eps), out.data_ptr(), _native.dtype_code("out", out), *work)
        return out
    return impl


def group_advantage(values: Tensor, group: Tensor, subkey: Optional[Tensor] = None, norm: str = "mean_std",
                    singleton: str = "unit", eps: float = ref.GROUP_EPS, backend: str = "auto") -> Tensor:
    """Normalises values within groups of equal ``group`` (and ``subkey``) ids (SPEC 6).

    ``norm``: "mean_std" (x - mean) / (std + eps) with unbiased std (GRPO); "mean"
    x - mean (Dr. GRPO, REINFORCE++ baseline); "rloo" n (x - mean) / (n - 1).
    ``singleton``: a group of one is treated as mean 0, std 1 ("unit": GRPO, RLOO) or
    gives 0 ("zero": GiGPO step groups).

    Args:
        values: (M,) float; group: (M,) int64; subkey: (M,) int64 or None.
    Returns:
        (M,) float32 (float64 for float64 values).
    """
    guard.choice("group_advantage", "norm", norm, GROUP_NORMS)
    guard.choice("group_advantage", "singleton", singleton, SINGLETONS)
    eps = guard.number("group_advantage", "eps", eps, 0.0)
    return _group_advantage(values, group, subkey, norm, singleton, eps, backend)

