"""The package imports from a plain source checkout, as the GPU check script uses it.

An install maps ``kernels/``, ``benchmarks/`` and ``csrc/`` into ``steppo_fast`` through
``package-dir``; a checkout on ``PYTHONPATH`` has no install metadata, and before the checkout
finder ``import steppo_fast.kernels`` raised ModuleNotFoundError there.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_plain(code: str, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ROOT
    # Run from an unrelated folder so nothing is found through the working directory.
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_plain_checkout_finds_mapped_subpackages(tmp_path):
    code = (
        "import os, steppo_fast, steppo_fast.kernels.logprob, steppo_fast.kernels.policy_loss, "
        "steppo_fast.benchmarks.harness, steppo_fast.csrc\n"
        "for m in (steppo_fast, steppo_fast.kernels, steppo_fast.benchmarks, steppo_fast.csrc):\n"
        "    print(os.path.dirname(os.path.abspath(m.__file__)))\n"
    )
    proc = _run_plain(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    dirs = proc.stdout.split()
    assert dirs == [os.path.join(ROOT, d) for d in ("steppo_fast", "kernels", "benchmarks", "csrc")]


def test_plain_checkout_runs_a_triton_op_and_the_cli(tmp_path):
    code = (
        "import os, torch, steppo_fast as sf\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(3, 7); y = torch.tensor([0, 6, 2]); m = torch.ones(3, dtype=torch.bool)\n"
        "a, _ = sf.token_logprobs(x, y, m, backend='triton')\n"
        "b, _ = sf.token_logprobs(x.double(), y, m, backend='reference')\n"
        "assert torch.allclose(a.double(), b, atol=1e-6), (a, b)\n"
        "from steppo_fast.cli import main\n"
        "main(['bench', '--help'])\n"
    )
    # TRITON_INTERPRET must be set before triton is imported, hence before steppo_fast.
    proc = _run_plain("import os; os.environ['TRITON_INTERPRET'] = '1'\n" + code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout, proc.stdout

