"""Random, often inconsistent, arguments for every CPU kernel: run as a script, in a process of its own.

``tests/test_robustness.py::test_cpu_kernels_survive_random_arguments`` runs this file with
``python tests/robustness_fuzz.py EXAMPLES`` and requires a normal exit: a kernel that reads or
writes out of bounds takes the whole process down, which no in-process test could report.

With a device argument (``python tests/robustness_fuzz.py EXAMPLES cuda``, or ``cpu`` with
TRITON_INTERPRET=1) it runs a fourth family instead: the GPU kernels of the ops that index by
value, against the C++ kernel's checks (``fuzz_gpu_index_checks``).

Three families of inputs, each drawn by hypothesis (derandomised: the same examples every run):

* layouts built with ``validate=False`` (packed rows, step rows, turns) from random step ids,
  num_steps, trajectory and group ids (negative, too large, duplicated, out of order):
  construction either raises ValueError or gives a well-formed layout, on which every
  estimator, the policy loss and the log-prob kernels run;
* valid layouts with one index tensor replaced by random values of random length, fed to the
  same fronts (torch's own index checks may raise IndexError / RuntimeError there: allowed);
* every public raw op (``steppo_fast.ops``) with random lengths and random index values.

With the C++ backend, bad sizes and indices must come back as ValueError or TypeError.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steppo_fast as sf
from steppo_fast import StepLayout, ops

warnings.simplefilter("ignore")
# One thread: the inputs are tiny, and waking OpenMP workers for each of thousands of small calls
# would cost more than the calls (the checks are per element, whatever the thread count).
torch.set_num_threads(1)

CLEAR = (ValueError, TypeError)  # what a bad argument may raise
ESTIMATORS = ("step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gigpo")
BACKEND = "cpp"

# Index values: mostly small (in range or just out of it), sometimes far out, either sign.
index_value = st.one_of(st.integers(-3, 9), st.sampled_from([10 ** 6, 2 ** 31 - 1, -(2 ** 31), 2 ** 40, -(2 ** 40)]))
small = st.integers(0, 7)


def index_tensor(length, dtype=torch.int64):
    return st.lists(index_value, min_size=length, max_size=length).map(
        lambda v: torch.tensor(v, dtype=torch.int64).to(dtype))


@st.composite
def int_tensor(draw, dtype=torch.int64, max_len=8):
    return draw(index_tensor(draw(st.integers(0, max_len)), dtype))


@st.composite
def float_tensor(draw, max_len=8, n=None):
    n = draw(st.integers(0, max_len)) if n is None else n
    vals = draw(st.lists(st.one_of(st.floats(-4, 4), st.just(float("nan"))), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32)


def well_formed(lay: StepLayout) -> None:
    """The structure every layout keeps, validated or not: every index in range, offsets consistent."""
    B, T = lay.token_shape
    N, S, R, G = B * T, lay.num_steps, lay.num_trajectories, lay.num_groups
    ts = lay.token_step.long()
    assert ts.shape == (N,) and bool(((ts >= -1) & (ts < S)).all())
    assert lay.step_traj.shape == (S,) and bool(((lay.step_traj >= 0) & (lay.step_traj < R)).all())
    assert lay.traj_group.shape == (R,) and bool(((lay.traj_group >= 0) & (lay.traj_group < G)).all())
    for off, total in ((lay.traj_step_offsets, S), (lay.step_token_offsets, lay.num_active_tokens)):
        assert int(off[0]) == 0 and int(off[-1]) == total and bool((off[1:] >= off[:-1]).all())
    assert lay.step_tokens.shape == (lay.num_active_tokens,)
    assert bool(((lay.step_tokens >= 0) & (lay.step_tokens < N)).all())
    # Each step's tokens carry that step's id: no token is handed to another trajectory.
    steps = torch.repeat_interleave(torch.arange(S), lay.step_num_tokens)
    assert bool((ts[lay.step_tokens] == steps).all())


def run_fronts(lay: StepLayout, seed: int, allowed=CLEAR) -> None:
    """Every estimator, the policy loss and the token log-probs over ``lay`` on the C++ backend."""
    g = torch.Generator().manual_seed(seed)
    B, T = lay.token_shape
    rew, val = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    keys = torch.randint(0, 3, (max(lay.num_steps, 0),), generator=g)
    for est in ESTIMATORS:
        try:
            sf.compute_advantages(est, lay, token_rewards=rew, values=val, anchor_keys=keys, gamma=0.9, lam=0.95,
                                  backend=BACKEND)
        except allowed:
            pass
    for level in ("step", "token"):
        try:
            lp = torch.randn(B, T, generator=g, requires_grad=True)
            loss, _ = sf.policy_loss(lp, lp.detach() + 0.1, rew, lay, ratio_level=level, backend=BACKEND)
            loss.backward()
        except allowed:
            pass
    try:
        z = torch.randn(B, T, 5, generator=g, requires_grad=True)
        y = torch.randint(0, 5, (B, T), generator=g)
        lp, ent = sf.token_logprobs(z, y, lay, backend=BACKEND)
        (lp.sum() + ent.sum()).backward()
    except allowed:
        pass


@st.composite
def packed_args(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(0, 6))
    sid = torch.tensor(draw(st.lists(st.lists(st.integers(-3, 5), min_size=T, max_size=T), min_size=B, max_size=B)),
                       dtype=torch.int64).reshape(B, T)
    num_steps = draw(st.none() | st.lists(st.integers(-2, 5), min_size=B, max_size=B).map(torch.tensor))
    group = draw(st.none() | st.lists(st.integers(-2, 3), min_size=B, max_size=B).map(torch.tensor))
    return sid, group, num_steps


@st.composite
def step_rows_args(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    ints = st.lists(st.integers(-2, 3), min_size=B, max_size=B).map(torch.tensor)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    return mask, draw(ints), draw(ints), draw(st.none() | ints)


@st.composite
def unvalidated_layout(draw):
    """A layout from random, often invalid, ids with validate=False: packed rows, step rows or turns
    (None when the constructor refuses them with ValueError)."""
    kind = draw(st.sampled_from(("packed", "step_rows", "turns")))
    try:
        if kind == "packed":
            return StepLayout.from_packed(*draw(packed_args()), validate=False)
        mask, traj, step, group = draw(step_rows_args())
        if kind == "step_rows":
            return StepLayout.from_step_rows(mask, traj, step, group, validate=False)
        return StepLayout.from_turns(mask, group, validate=False)
    except ValueError:
        return None


def fuzz_unvalidated_layouts(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(unvalidated_layout(), st.integers(0, 2 ** 16))
    def check(lay, seed):
        if lay is None:
            return
        well_formed(lay)
        run_fronts(lay, seed)

    check()


FIELDS = ("token_step", "step_traj", "traj_step_offsets", "traj_group", "step_token_offsets", "step_tokens")


def fuzz_corrupted_layouts(examples: int) -> None:
    base = StepLayout.from_packed(torch.tensor([[0, 0, -1, 1, 1], [-1, 0, 1, 1, 2], [0, -1, -1, 1, -1]]),
                                  torch.tensor([0, 0, 1]))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(FIELDS), int_tensor(max_len=16), st.integers(0, 2 ** 16))
    def check(field, values, seed):
        old = getattr(base, field)
        lay = dataclasses.replace(base, **{field: values.to(old.dtype)})
        # A hand-made layout may fail torch's own index checks in the fronts' glue: a Python error.
        run_fronts(lay, seed, allowed=CLEAR + (IndexError, RuntimeError))

    check()


@st.composite
def raw_call(draw):
    """(name, thunk): one public raw op with random index values and lengths that mostly agree
    (so that most calls reach the kernels) and sometimes do not."""
    op = draw(st.sampled_from(("step_rewards", "broadcast_to_tokens", "step_gae", "token_gae", "whiten",
                               "group_advantage", "token_logprobs", "policy_loss", "value_loss")))
    n, m, k = draw(small), draw(small), draw(st.integers(1, 5))
    odd = draw(st.integers(0, 9))  # the one argument whose length is random (none when beyond the last)
    count = iter(range(100))

    def ln(size):
        return draw(small) if next(count) == odd else size

    def f(size):
        return draw(float_tensor(n=ln(size)))

    def i(size, dtype=torch.int64, below=None):  # indices, mostly in [0, below) when given
        vals = index_value if below is None else st.one_of(st.integers(0, max(below - 1, 0)), index_value)
        length = ln(size)
        return torch.tensor(draw(st.lists(vals, min_size=length, max_size=length)), dtype=torch.int64).to(dtype)

    def offsets(count, total):  # CSR offsets: mostly valid, sometimes random
        if draw(st.booleans()):
            cuts = sorted(draw(st.lists(st.integers(0, total), min_size=count - 1, max_size=count - 1)))
            return torch.tensor([0] + cuts + [total]) if count >= 1 else torch.zeros(0, dtype=torch.int64)
        return i(count + 1)

    if op == "step_rewards":
        a = (f(n), i(n, torch.int32, below=k), i(m, below=n), offsets(k, m))
        return op, lambda: ops.step_rewards(*a, backend=BACKEND)
    if op == "broadcast_to_tokens":
        a = (f(k), i(n, torch.int32, below=k))
        return op, lambda: ops.broadcast_to_tokens(*a, backend=BACKEND)
    if op == "step_gae":
        a = (f(m), f(m), offsets(k, m))
        return op, lambda: ops.step_gae(*a, 0.9, 0.8, backend=BACKEND)
    if op == "token_gae":
        a = (f(n), f(n), i(m, below=n), offsets(k, m), offsets(draw(st.integers(1, 3)), k))
        return op, lambda: ops.token_gae(*a, 0.9, 0.8, backend=BACKEND)
    if op == "whiten":
        x = f(n)
        mask = draw(st.none() | st.just(i(n).gt(0)))
        mode = draw(st.sampled_from(("step", "token")))
        return op, lambda: ops.whiten(x, mask, mode, backend=BACKEND)
    if op == "group_advantage":
        a = (f(n), i(n), draw(st.none() | st.just(i(n))))
        norm = draw(st.sampled_from(ops.GROUP_NORMS))
        return op, lambda: ops.group_advantage(*a, norm=norm, backend=BACKEND)
    if op == "token_logprobs":
        v = draw(st.integers(0, 4))
        z = torch.randn(n, v) if draw(st.booleans()) else torch.randn(n, 2, v)
        rows = n if z.dim() == 2 else 2 * n
        y = i(rows, draw(st.sampled_from((torch.int32, torch.int64))), below=v)
        mask = i(rows).gt(0)
        inplace = draw(st.booleans())
        return op, lambda: ops.token_logprobs(z, y, mask, 0.7, True, inplace, backend=BACKEND)
    if op == "policy_loss":
        lp, old, adv = f(n), f(n), f(n)
        num_steps = draw(st.integers(-1, 6))
        ts = i(n, draw(st.sampled_from((torch.int32, torch.int64))), below=num_steps)
        opt = dict(weights=draw(st.none() | st.just(f(n))), entropy=draw(st.none() | st.just(f(n))),
                   ref_logp=draw(st.none() | st.just(f(n))), ratio_level=draw(st.sampled_from(("step", "token"))),
                   kl_coef=0.1, entropy_coef=0.01, dual_clip=draw(st.sampled_from((None, 3.0))),
                   agg_mode=draw(st.sampled_from(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))))
        return op, lambda: ops.policy_loss(lp, old, adv, ts, num_steps, backend=BACKEND, **opt)
    a = (f(n), f(n), f(n), draw(st.none() | st.just(i(n).gt(0))))
    return op, lambda: ops.value_loss(*a, backend=BACKEND)


def fuzz_raw_ops(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw_call())
    def check(call):
        _, thunk = call
        try:
            thunk()
        except CLEAR:
            pass

    check()


# ------------------------------------------------------------------ the GPU kernels' index checks
INDEX_CHECKED = ("step_rewards", "broadcast_to_tokens", "step_gae", "token_gae")


@st.composite
def index_checked_call(draw, names=INDEX_CHECKED):
    """(op, args): one raw op of ``names`` (their GPU kernels check index values), with lengths that
    agree and index values that are mostly right and often not."""
    op = draw(st.sampled_from(names))
    n, m, k = draw(small), draw(small), draw(st.integers(1, 5))

    def f(size):
        return draw(float_tensor(n=size))

    def i(size, dtype=torch.int64, below=None):
        vals = index_value if below is None else st.one_of(st.integers(0, max(below - 1, 0)), index_value)
        return torch.tensor(draw(st.lists(vals, min_size=size, max_size=size)), dtype=torch.int64).to(dtype)

    def offsets(count, total):
        if count == 0:  # no entries: one offset, which must be 0 and total at once
            return torch.tensor([draw(st.sampled_from((0, total)))])
        if draw(st.booleans()):
            cuts = sorted(draw(st.lists(st.integers(0, total), min_size=count - 1, max_size=count - 1)))
            return torch.tensor([0] + cuts + [total])
        return i(count + 1, below=total + 1)

    if op == "step_rewards":
        return op, (f(n), i(n, torch.int32, below=k), i(m, below=n), offsets(k, m))
    if op == "broadcast_to_tokens":
        return op, (f(k), i(n, torch.int32, below=k))
    if op == "step_gae":
        return op, (f(m), f(m), offsets(k, m), 0.9, 0.8)
    return op, (f(n), f(n), i(m, below=n), offsets(k, m), offsets(draw(st.integers(0, 3)), k), 0.9, 0.8)


def fuzz_gpu_index_checks(examples: int, device: torch.device) -> None:
    """The GPU kernels of the index-checked ops on ``device`` (on the CPU: the Triton kernels, in the
    interpreter) against the C++ kernel: they never raise; a call reports bad indices in the
    device's error words exactly when the C++ kernel raises, the argument the C++ kernel names among
    them; a good call gives the C++ kernel's results (to rounding) and reports nothing; a step
    reward is NaN exactly where the step's offsets or one of its tokens is bad (or its rewards hold
    NaN)."""
    from steppo_fast.ops._registry import available_backends
    from steppo_fast.testing import assert_close

    names = [op for op in INDEX_CHECKED if set(available_backends(op, device.type)) & {"triton", "cuda"}]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(index_checked_call(names))
    def check(call):
        op, args = call
        try:
            want, named = getattr(ops, op)(*args, backend="cpp"), None
        except ValueError as exc:
            want, named = None, str(exc).split("[")[0].split(" ")[0]
        for backend in ("triton", "cuda"):
            if backend not in available_backends(op, device.type):
                continue
            ops.index_errors(device)
            got = getattr(ops, op)(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args),
                                   backend=backend)
            seen = ops.index_errors(device)
            where = f"{op} {backend} {args}: {seen}, C++: {named}"
            assert bool(seen) == (named is not None), where
            # A token listed twice (in range, so no error) has two writers in token GAE, in an order
            # the GPU does not fix: its values are compared only when every token is listed once.
            racy = op == "token_gae" and args[2].unique().numel() < args[2].numel()
            if named is not None:
                assert f"{op}: {named}" in seen, where
            elif not racy:
                pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
                for g, w in pairs:
                    assert_close(g.cpu(), w, msg=where)
            if op == "step_rewards":
                r, _, tok, off = args
                nan = []
                for s in range(off.numel() - 1):
                    b, e = int(off[s]), int(off[s + 1])
                    ok = 0 <= b <= e <= tok.numel() and all(0 <= int(t) < r.numel() for t in tok[b:e])
                    nan.append(not ok or bool(torch.isnan(r[tok[b:e]]).any()))
                assert torch.isnan(got.cpu()).tolist() == nan, where

    check()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if len(sys.argv) > 2:  # a device: the index checks of the GPU kernels there
        fuzz_gpu_index_checks(n, torch.device(sys.argv[2]))
        print("fuzz: GPU kernels agree with the C++ checks")
        sys.exit(0)
    fuzz_unvalidated_layouts(n)
    fuzz_corrupted_layouts(n)
    fuzz_raw_ops(3 * n)
    print("fuzz: no crash")
