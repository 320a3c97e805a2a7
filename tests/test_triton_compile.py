"""Every specialisation the Triton launchers produce compiles for sm_80 and sm_90, without a GPU.

The interpreter checks what the kernels compute; this checks what a GPU would compile. It runs
tests/triton_aot.py in a process without TRITON_INTERPRET: a stand-in Triton driver turns each
launch of the real launchers into a compile (down to cubin with the ptxas Triton ships) for an
sm_80 or sm_90 target. It fails on a compile error, a register spill, or a bf16 log-prob loop
over its instruction budget (tests/triton_aot.py, LOOP_BUDGET).
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_policy_loss_kernel", "_step_means_kernel",
           "_step_rewards_kernel")


def test_every_launcher_specialisation_compiles_for_sm80_and_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver  # noqa: F401
    except ImportError:  # pragma: no cover - a Triton without these APIs
        pytest.skip("this Triton has no driver API to stand in for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "tests", "triton_aot.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"\b(\d+) specialisations compiled, 0 failures", proc.stdout), out
    for arch in (80, 90):
        for name in KERNELS:
            assert re.search(rf"^ok {name} sm_{arch} ", proc.stdout, re.M), f"{name} not compiled for sm_{arch}\n{out}"
        # The policy loss options are run-time arguments: one variant per float dtype.
        assert len(re.findall(rf"^ok _policy_loss_kernel sm_{arch} ", proc.stdout, re.M)) == 2, out
    # The bf16 loops were measured against their instruction budget on sm_90.
    assert len(re.findall(r"^ok _token_logprobs_(fwd|bwd)_kernel sm_90 .* loop=", proc.stdout, re.M)) >= 2, out
