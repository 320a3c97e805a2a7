"""Never crash, never silently wrong: bad input gets a clear error on every path.

Inputs that used to take the process down (an out-of-bounds read or write in a kernel) run in a
child process, so that a regression fails its test instead of ending the test run. What
``validate=False`` still guarantees is spelled out in the README ("What validate=False promises").
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import steppo_fast as sf
from steppo_fast import LossConfig, StepLayout, _native, ops
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sf.__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
needs_cpp = pytest.mark.skipif(_native.cpu_module() is None, reason="steppo_fast._C is not built")


def _run_python(args, timeout):
    """Runs ``python args`` with this process's steppo_fast first on the path.

    The child runs in the tests folder: ``python -c`` puts its working directory first on the
    path, and from the repository root that would import the source checkout (without its
    compiled modules, when the package is installed) instead of this process's steppo_fast.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=_HERE)


# --------------------------------------------------------------------------------------- crashes
# Each case once crashed the process (abort or segfault) or read past its arguments. The child runs
# them in order and prints one line each; a crash cuts the output short.
_CRASH_SETUP = """
import dataclasses, resource, warnings, torch, steppo_fast as sf
from steppo_fast import StepLayout, ops
warnings.simplefilter("ignore")
good = StepLayout.from_packed(torch.tensor([[0, -1, 1], [0, -1, 1]]), torch.tensor([0, 0]))
# First, while the peak memory of this process is still that of the import: validating one huge
# step id (the gap check used to allocate B x max id flags, 1.7 GB here).
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    StepLayout.from_packed(torch.tensor([[0, 0, 1], [0, -1, 2 ** 27]]))
except ValueError:
    pass
print("validation peak growth", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) // 1024, sep="\t")
"""
CRASH_CASES = {
    # from_packed(validate=False) with negative num_steps: abort (free(): invalid pointer) / segfault.
    "num_steps -1, 2": ("StepLayout.from_packed(torch.full((2, 3), -1), None, torch.tensor([-1, 2]), validate=False)",
                        r"num_steps must be non-negative: trajectory 0 has -1"),
    "num_steps -1, 1": ("StepLayout.from_packed(torch.full((2, 3), -1), None, torch.tensor([-1, 1]), validate=False)",
                        r"num_steps must be non-negative"),
    "num_steps -2, 2": ("StepLayout.from_packed(torch.full((2, 3), -1), None, torch.tensor([-2, 2]), validate=False)",
                        r"num_steps must be non-negative"),
    # A validate=False layout whose step ids exceed num_steps, then the C++ GRPO: segfault.
    "ids beyond num_steps": (
        "sf.compute_advantages('grpo', StepLayout.from_packed(torch.tensor([[0, -1, 2], [2, -1, 3]]), None, "
        "torch.tensor([0, 0]), validate=False), token_rewards=torch.ones(2, 3), backend='cpp')",
        r"trajectory 0: step id 2 is not below num_steps = 0"),
    # The same through a layout edited by hand: the kernels check what they read.
    "hand-made layout": (
        "sf.compute_advantages('grpo', dataclasses.replace(good, token_step=torch.tensor([0, -1, 9, 2, -1, 3], "
        "dtype=torch.int32)), token_rewards=torch.ones(2, 3), backend='cpp')",
        r"token_step\[2\] = 9 is not below the number of step values \(4\)"),
    "hand-made step_tokens": (
        "sf.compute_advantages('token_gae', dataclasses.replace(good, step_tokens=torch.tensor([0, 2, 10**6, 5])), "
        "token_rewards=torch.ones(2, 3), values=torch.zeros(2, 3), backend='cpp')",
        r"step_tokens\[2\] = 1000000 is outside \[0, 6\)"),
    # The registry's raw ops trusted every index and length.
    "step_gae offsets": ("ops.step_gae(torch.zeros(2), torch.zeros(2), torch.tensor([0, 10**6]), backend='cpp')",
                         r"traj_step_offsets\[1\] = 1000000 must equal the number of steps \(2\)"),
    "step_gae offsets order": (
        "ops.step_gae(torch.zeros(4), torch.zeros(4), torch.tensor([0, 3, 1, 4]), backend='cpp')",
        r"traj_step_offsets must be non-decreasing offsets in \[0, 4\]"),
    "token_gae index": (
        "ops.token_gae(torch.zeros(3), torch.zeros(3), torch.tensor([0, 10**6]), torch.tensor([0, 2]), "
        "torch.tensor([0, 1]), backend='cpp')", r"step_tokens\[1\] = 1000000 is outside \[0, 3\)"),
    "broadcast index": (
        "ops.broadcast_to_tokens(torch.zeros(2), torch.tensor([0, 10**8], dtype=torch.int32), backend='cpp')",
        r"token_step\[1\] = 100000000 is not below"),
    "step_rewards index": (
        "ops.step_rewards(torch.zeros(3), torch.zeros(3, dtype=torch.int32), torch.tensor([0, 10**9]), "
        "torch.tensor([0, 2]), backend='cpp')", r"step_tokens\[1\] = 1000000000 is outside \[0, 3\)"),
    "step_rewards offsets": (
        "ops.step_rewards(torch.zeros(3), torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1]), "
        "torch.tensor([0, 10**9]), backend='cpp')", r"step_token_offsets must be non-decreasing offsets in \[0, 2\]"),
    # ... and every length: these read past the end of the short argument.
    "broadcast short values": (
        "ops.broadcast_to_tokens(torch.arange(10.)[:2], torch.tensor([0, 1, 5], dtype=torch.int32), backend='cpp')",
        r"token_step\[2\] = 5 is not below the number of step values \(2\)"),
    "short labels": ("ops.token_logprobs(torch.randn(4, 5), torch.tensor([0, 1]), torch.ones(4, dtype=torch.bool), "
                     "backend='cpp')", r"token_logprobs: labels must have 4 elements"),
    "short mask": ("ops.token_logprobs(torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long), "
                   "torch.ones(3, dtype=torch.bool), backend='cpp')", r"token_logprobs: mask must have 6 elements"),
    "short old_logp": ("ops.policy_loss(torch.zeros(4), torch.zeros(2), torch.zeros(4), "
                       "torch.zeros(4, dtype=torch.int32), 1, backend='cpp')",
                       r"policy_loss: old_logp must have the shape of logp \(4,\)"),
    "short token_step": ("ops.policy_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), "
                         "torch.zeros(2, dtype=torch.int32), 1, backend='cpp')",
                         r"policy_loss: token_step must have the shape of logp"),
    "short group": ("ops.group_advantage(torch.zeros(4), torch.zeros(2, dtype=torch.int64), backend='cpp')",
                    r"group_advantage: group must have the shape of values \(4,\)"),
    "short step_values": ("ops.step_gae(torch.zeros(4), torch.zeros(2), torch.tensor([0, 4]), backend='cpp')",
                          r"step_gae: step_values must have the shape of step_rewards"),
    "short whiten mask": ("ops.whiten(torch.zeros(4), torch.ones(2, dtype=torch.bool), 'token', backend='cpp')",
                          r"whiten: mask must have the shape of x"),
}


@pytest.fixture(scope="module")
def crash_results():
    lines = [_CRASH_SETUP, "CASES = {"] + [f"    {name!r}: {code!r}," for name, (code, _) in CRASH_CASES.items()]
    lines += ["}", "for name, code in CASES.items():",
              "    try:",
              "        eval(code)",
              "        print(name, 'OK', sep='\\t', flush=True)",
              "    except Exception as e:",
              "        print(name, type(e).__name__, str(e).replace('\\n', ' '), sep='\\t', flush=True)"]
    out = _run_python(["-c", "\n".join(lines)], timeout=300)
    got = {}
    for line in out.stdout.splitlines():
        name, *rest = line.split("\t")
        got[name] = rest
    return got, out


@needs_cpp
@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_input_that_crashed_now_raises_value_error(crash_results, case):
    got, out = crash_results
    assert case in got, (f"the process died before case {case!r} printed (exit code {out.returncode}): "
                         f"{out.stderr[-2000:]}")
    kind, *msg = got[case]
    assert kind == "ValueError", f"{case}: {kind} {msg}"
    assert re.search(CRASH_CASES[case][1], msg[0]), msg[0]


def test_unvalidated_step_id_is_never_given_to_another_trajectory():
    # Row 0 declares 1 step but has a token of step 1: that id (0 + 1) is trajectory 1's step 0.
    with pytest.raises(ValueError, match=r"trajectory 0: step id 1 is not below num_steps = 1"):
        StepLayout.from_packed(torch.tensor([[0, 1], [0, -1]]), None, torch.tensor([1, 1]), validate=False)


def test_unvalidated_layout_keeps_its_ids_in_int32():
    with pytest.raises(ValueError, match=r"at most 2147483647 \(token_step is int32\)"):
        StepLayout.from_packed(torch.tensor([[0, 2 ** 40]]), validate=False)


@pytest.mark.parametrize("step_id", [2 ** 27, 2 ** 40])
def test_validation_of_huge_step_ids_is_a_message(step_id):
    # Validation used to allocate B x (max id) flags: 1.7 GB for 2^27, an allocator error for 2^40.
    with pytest.raises(ValueError, match=rf"trajectory 1: gap in step indices, step 1 has no agent token but step "
                                         rf"{step_id} does"):
        StepLayout.from_packed(torch.tensor([[0, 0, 1], [0, -1, step_id]]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_validation_memory_does_not_grow_with_step_ids(crash_results):
    got, out = crash_results
    assert "validation peak growth" in got, out.stderr[-2000:]
    assert int(got["validation peak growth"][0]) < 100, "MiB of peak memory to validate one step id of 2^27"


def test_unvalidated_layout_of_gaps_and_low_ids_is_well_formed():
    # What validate=False does not check still gives a well-formed layout of what the ids say.
    lay = StepLayout.from_packed(torch.tensor([[-5, 0, 2, -1], [1, 1, -1, -1]]), validate=False)
    assert lay.num_steps == 5 and lay.token_step.tolist() == [-1, 0, 2, -1, 4, 4, -1, -1]
    assert lay.step_num_tokens.tolist() == [1, 0, 1, 0, 2]


@needs_cpp
def test_cpu_kernels_survive_random_arguments():
    """Random (often inconsistent) validate=False layouts and raw-op arguments for every CPU kernel,
    in a child process: it must exit normally (``tests/robustness_fuzz.py``)."""
    out = _run_python([os.path.join(_HERE, "robustness_fuzz.py"), "200"], timeout=600)
    assert out.returncode == 0 and "fuzz: no crash" in out.stdout, (
        f"exit code {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


# ------------------------------------------------------------- index values on the GPU kernels
# The GPU kernels cannot raise without waiting for the device: they skip a bad index, write NaN
# where it would have gone and report it in error words on the device (README, "What
# validate=False promises"). The Triton interpreter runs the Triton kernel of step_rewards on the
# CPU, error words included; tests/test_gpu.py does the same for the CUDA kernels.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in ops.available_backends("step_rewards", "cpu"),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
CPU = torch.device("cpu")


def _bad_step_rewards_args():
    r = torch.arange(6, dtype=torch.float64)
    tok = torch.tensor([0, 1, 2, 9, 4, 5, -1])  # positions 3 (token 9) and 6 (token -1) are outside [0, 6)
    # Step 0 is [0, 2); step 1 holds position 3; step 2's offsets are out of order; step 3 holds
    # positions 3 and 6; step 4 ends past the 7 step tokens.
    off = torch.tensor([0, 2, 4, 3, 7, 9])
    return r, torch.zeros(6, dtype=torch.int32), tok, off


@needs_interpreter
def test_triton_step_rewards_skips_bad_offsets_and_indices_and_reports_them():
    ops.index_errors(CPU)
    out = ops.step_rewards(*_bad_step_rewards_args(), backend="triton")
    assert out[0].item() == 1.0 and torch.isnan(out[1:]).all(), out
    assert ops.index_errors(CPU) == {"step_rewards: step_token_offsets": 2, "step_rewards: step_tokens": 3}
    assert ops.index_errors(CPU) == {}  # read and reset
    # Where the C++ kernel raises:
    if _native.cpu_module() is not None:
        with pytest.raises(ValueError, match=r"step_token_offsets must be non-decreasing offsets in \[0, 7\], got "
                                             r"step_token_offsets\[2\] = 4 and step_token_offsets\[3\] = 3"):
            ops.step_rewards(*_bad_step_rewards_args(), backend="cpp")


@needs_interpreter
def test_triton_step_rewards_error_words_collect_calls_until_checked():
    r, ts, tok, off = _bad_step_rewards_args()
    good = torch.tensor([0, 2, 2, 6])
    ops.index_errors(CPU)
    ops.step_rewards(r, ts, torch.arange(6), good, backend="triton")
    assert ops.index_errors(CPU, reset=False) == {}
    ops.step_rewards(r, ts, tok, torch.tensor([0, 4, 7]), backend="triton")  # position 3 only
    ops.step_rewards(r, ts, torch.arange(6), good, backend="triton")  # a later good call clears nothing
    ops.step_rewards(r, ts, tok, torch.tensor([0, 2, 1]), backend="triton")  # step 1 only
    with pytest.raises(ValueError, match=r"step_rewards: step_token_offsets\[1\]; step_rewards: step_tokens\[3\] "
                                         r"\(first bad position over the calls since the last check\)"):
        ops.check_index_errors(CPU)
    ops.check_index_errors(CPU)  # reset by the check


@needs_interpreter
@needs_cpp
def test_sync_index_checks_raise_the_cpp_kernels_error_at_the_call(monkeypatch):
    monkeypatch.setenv("STEPPO_FAST_SYNC_INDEX_CHECKS", "1")
    ops.index_errors(CPU)
    with pytest.raises(ValueError, match=r"step_token_offsets must be non-decreasing offsets in \[0, 7\]"):
        ops.step_rewards(*_bad_step_rewards_args(), backend="triton")
    r, ts, tok, _ = _bad_step_rewards_args()
    with pytest.raises(ValueError, match=r"step_tokens\[3\] = 9 is outside \[0, 6\)"):
        ops.step_rewards(r, ts, tok, torch.tensor([0, 4, 7]), backend="triton")
    good = ops.step_rewards(r, ts, torch.arange(6), torch.tensor([0, 2, 2, 6]), backend="triton")
    assert ops.index_errors(CPU) == {}  # the calls had words of their own
    monkeypatch.delenv("STEPPO_FAST_SYNC_INDEX_CHECKS")
    again = ops.step_rewards(r, ts, torch.arange(6), torch.tensor([0, 2, 2, 6]), backend="triton")
    assert torch.equal(good, again) and good.tolist() == [1.0, 0.0, 14.0]


@needs_interpreter
@needs_cpp
def test_interpreted_triton_kernels_agree_with_the_cpp_checks_on_random_indices():
    """tests/robustness_fuzz.py's GPU family on the CPU: Triton's step_rewards, interpreted, against the
    C++ kernel on random offsets and indices, in a child process (an out-of-bounds read there could
    take the process down)."""
    out = _run_python([os.path.join(_HERE, "robustness_fuzz.py"), "150", "cpu"], timeout=600)
    assert out.returncode == 0 and "GPU kernels agree with the C++ checks" in out.stdout, (
        f"exit code {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


# ------------------------------------------------------------------------------- silently wrong
def _layout():
    return StepLayout.from_step_rows(torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1]), torch.tensor([0, 0]))


def test_token_inputs_must_have_the_layouts_shape_not_just_its_size():
    lay = _layout()  # (B, T) = (2, 3); the mistake: (T, B) inputs
    y = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the layout describes \(2, 3\) tokens but the leading shape is \(3, 2\)"):
        sf.token_logprobs(torch.randn(3, 2, 5), y, lay)
    with pytest.raises(ValueError, match=r"the layout describes \(2, 3\) tokens but the leading shape is \(3, 2\)"):
        sf.linear_token_logprobs(torch.randn(3, 2, 4), torch.randn(5, 4), y, lay)
    with pytest.raises(ValueError, match=r"the layout describes \(2, 3\) tokens but hidden has leading shape"):
        sf.linear_steppo_loss(torch.randn(3, 2, 4), torch.randn(5, 4), y, lay, torch.zeros(3, 2), torch.zeros(3, 2))
    # Flat (N,) token tensors stay accepted.
    lp, _ = sf.token_logprobs(torch.randn(6, 5), torch.zeros(6, dtype=torch.long), lay)
    assert lp.shape == (6,)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_global_num_tokens_nan_is_refused_on_every_backend(backend):
    lp = torch.zeros(4, requires_grad=True)
    m = torch.ones(4, dtype=torch.bool)
    for name, value in (("global_num_tokens", float("nan")), ("global_num_steps", float("nan")),
                        ("norm_constant", float("inf"))):
        with pytest.raises(ValueError, match=rf"{name} must be finite"):
            sf.policy_loss(lp, torch.zeros(4), torch.zeros(4), m, backend=backend,
                           agg_mode="seq-mean-token-sum-norm", **{name: value})


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0, 0.0, True])
def test_non_finite_or_odd_temperature_is_refused(temperature):
    z, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        sf.token_logprobs(z, y, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        sf.linear_token_logprobs(torch.randn(4, 3), torch.randn(5, 3), y, temperature=temperature)
    with pytest.raises((ValueError, TypeError), match="temperature must be"):
        ops.token_logprobs(z, y, torch.ones(4, dtype=torch.bool), temperature)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        sf.StepPOLoss(temperature=temperature)


# ------------------------------------------------------------------------ errors that are messages
def _loss_args():
    return torch.zeros(4, requires_grad=True), torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clip_high=None), TypeError, r"clip_high must be a number, got None"),
    (dict(clip_low="0.2"), TypeError, r"clip_low must be a number"),
    (dict(clip_high=float("inf")), ValueError, r"clip_high must be finite"),
    (dict(entropy_coef=float("nan")), ValueError, r"entropy_coef must be finite"),
    (dict(kl_coef=float("inf")), ValueError, r"kl_coef must be finite"),
    (dict(dual_clip=float("nan")), ValueError, r"dual_clip must be finite"),
    (dict(global_num_steps=-1), ValueError, r"global_num_steps must be > 0"),
    (dict(global_num_tokens=0), ValueError, r"global_num_tokens must be > 0"),
    (dict(global_num_tokens=True), TypeError, r"global_num_tokens must be a number"),
])
def test_bad_loss_options_name_the_option(kwargs, error, match):
    lp, old, adv, m = _loss_args()
    with pytest.raises(error, match=match):
        sf.policy_loss(lp, old, adv, m, **kwargs)
    with pytest.raises(error, match=match):
        LossConfig(**kwargs)
    with pytest.raises(error, match=match):
        ops.policy_loss(lp, old, adv, torch.zeros(4, dtype=torch.int32), 1, **kwargs)


def test_loss_config_checks_every_field():
    with pytest.raises(TypeError, match=r"LossConfig: entropy_coef must be a number, got 'x'"):
        LossConfig(entropy_coef="x")
    with pytest.raises(TypeError, match=r"LossConfig: kl_coef must be a number"):
        LossConfig(kl_coef=None)
    with pytest.raises(ValueError, match=r"LossConfig: kl_type must be one of"):
        LossConfig(kl_type=3)


def test_missing_tensors_are_named():
    lp, old, adv, m = _loss_args()
    with pytest.raises(TypeError, match=r"old_logp must be a float tensor of the shape of logp \(4,\), got None"):
        sf.policy_loss(lp, None, adv, m)
    with pytest.raises(TypeError, match=r"advantages must be a float tensor of the shape of logp \(4,\), got None"):
        sf.policy_loss(lp, old, None, m)
    with pytest.raises(TypeError, match=r"policy_loss: old_logp must be a float tensor, got NoneType"):
        ops.policy_loss(lp, None, adv, torch.zeros(4, dtype=torch.int32), 1)
    h, w, y = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"advantages must be a float tensor .*got None"):
        sf.linear_steppo_loss(h, w, y, _layout(), torch.zeros(2, 3), None)
    with pytest.raises(TypeError, match=r"returns must be a float tensor .*got None"):
        sf.value_loss(torch.zeros(3), torch.zeros(3), None)


def test_value_loss_errors_speak_of_values():
    with pytest.raises(ValueError, match=r"old_values must have the shape of values \(3,\), got \(2,\)"):
        sf.value_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match=r"mask must be a bool, integer or float tensor, got list"):
        sf.value_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), mask=[1, 1, 0])
    with pytest.raises(ValueError, match=r"value_loss: clip must be finite"):
        sf.value_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip=float("nan"))


def test_compute_advantages_checks_layout_and_discounts():
    lay, r, v = _layout(), torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"compute_advantages: layout must be a StepLayout, got NoneType"):
        sf.compute_advantages("grpo", None, token_rewards=r)
    for name in ("gamma", "lam"):
        with pytest.raises(ValueError, match=rf"compute_advantages: {name} must be finite, got nan"):
            sf.compute_advantages("step_gae", lay, token_rewards=r, values=v, **{name: float("nan")})
        with pytest.raises(ValueError, match=rf"compute_advantages: {name} must be <= 1.0, got 1.5"):
            sf.compute_advantages("token_gae", lay, token_rewards=r, values=v, **{name: 1.5})
    with pytest.raises(ValueError, match=r"compute_advantages: step_weight must be finite"):
        sf.compute_advantages("gigpo", lay, token_rewards=r, anchor_keys=torch.zeros(2, dtype=torch.long),
                              step_weight=float("inf"))


@pytest.mark.parametrize("op", ["step_gae", "token_gae"])
@pytest.mark.parametrize("name, value, match", [("gamma", 1.5, "must be <= 1.0"), ("gamma", -0.1, "must be >= 0.0"),
                                                ("lam", float("nan"), "must be finite"),
                                                ("gamma", "0.9", "must be a number")])
def test_raw_gae_ops_check_discounts(op, name, value, match):
    r, off = torch.zeros(3), torch.tensor([0, 3])
    args = (r, r, off) if op == "step_gae" else (r, r, torch.arange(3), torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises((ValueError, TypeError), match=rf"{op}: {name} {match}"):
        getattr(ops, op)(*args, **{name: value})


def test_nan_in_a_float_mask():
    """Where a front synchronises anyway (layouts, validated log-probs) a NaN in a float mask raises;
    the losses never synchronise, so there it makes the loss and every metric NaN."""
    nan_mask = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match=r"response_mask holds NaN in row 0"):
        StepLayout.from_step_rows(nan_mask, torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"response_mask holds NaN in row 0"):
        StepLayout.from_turns(nan_mask)
    with pytest.raises(ValueError, match=r"mask holds NaN at token 1"):
        sf.token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), nan_mask)
    with pytest.raises(ValueError, match=r"mask holds NaN at token 1"):
        sf.linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                 nan_mask)
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = sf.policy_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), nan_mask)
    assert torch.isnan(loss) and all(bool(torch.isnan(v)) for v in metrics.values())
    vl, clipfrac = sf.value_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), nan_mask[0])
    assert torch.isnan(vl) and torch.isnan(clipfrac)
    # A 0/1 float mask is read as the bool mask it stands for.
    fm = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    l1, _ = sf.policy_loss(lp, torch.zeros(2, 3) - 0.1, torch.ones(2, 3), fm)
    l2, _ = sf.policy_loss(lp, torch.zeros(2, 3) - 0.1, torch.ones(2, 3), fm.bool())
    assert_close(l1, l2)


def test_float_masks_of_raw_ops_are_refused():
    x = torch.zeros(3)
    with pytest.raises(TypeError, match=r"whiten: mask must be a bool \(or integer 0/1\) tensor, got dtype"):
        ops.whiten(x, torch.ones(3), "token")
    with pytest.raises(TypeError, match=r"value_loss: mask must be a bool"):
        ops.value_loss(x, x, x, torch.ones(3))


def test_flags_are_bools():
    z, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        ops.token_logprobs(z, y, torch.ones(4, dtype=torch.bool), 1.0, True, "yes")
    with pytest.raises(TypeError, match="whiten must be a bool"):
        sf.compute_advantages("grpo", _layout(), token_rewards=torch.ones(2, 3), whiten="no")


def test_valid_calls_are_unchanged_by_the_checks():
    """The checks accept what the fronts produce: one pass of every estimator matches the fp64 reference."""
    lay = StepLayout.from_packed(torch.tensor([[0, 0, -1, 1], [0, 1, 1, -1], [-1, 0, 0, 0]]), torch.tensor([0, 0, 1]))
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    adv = sf.compute_advantages("grpo", lay, token_rewards=r)
    scores = ref.trajectory_scores(ref.step_rewards(r.reshape(-1).double(), lay.token_step, lay.num_steps),
                                   lay.step_traj, lay.num_trajectories)
    want = ref.broadcast_to_tokens(ref.grpo(scores, lay.traj_group)[lay.step_traj], lay.token_step)
    assert_close(adv.token_advantages.reshape(-1), want, torch.float32)


def test_nan_in_the_mask_of_the_fused_loss_is_refused_when_validating():
    mask = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 0.0]])
    h, w, y = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mask holds NaN at token 1"):
        sf.linear_steppo_loss(h, w, y, mask, torch.zeros(2, 3), torch.zeros(2, 3))
