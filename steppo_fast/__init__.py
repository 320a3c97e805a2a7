"""steppo_fast: fast, exact StepPO training math.

Importing the package initialises no GPU and builds nothing: compiled modules and
Triton kernels load on first use.
"""

import importlib.abc
import importlib.util
import os
import sys


class _CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """Finds ``steppo_fast.kernels``, ``.benchmarks`` and ``.csrc`` in a plain source checkout.

    An install maps the top-level folders ``kernels/``, ``benchmarks/`` and ``csrc/`` into the
    package (``[tool.setuptools.package-dir]``). A checkout used as it is (``PYTHONPATH`` at its
    root, compiled modules built with ``setup.py build_ext --inplace``) has no such mapping, so
    this finder supplies it. It sits last on ``sys.meta_path``: an installed mapping, regular or
    editable, is always found first.
    """

    def __init__(self, folders):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def _map_checkout_subpackages() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {}
    for name in ("kernels", "benchmarks", "csrc"):
        folder = os.path.join(root, name)
        if not os.path.isdir(os.path.join(here, name)) and os.path.isfile(os.path.join(folder, "__init__.py")):
            folders[f"{__name__}.{name}"] = folder
    # Only next to this package's own pyproject: never map folders of an unrelated parent directory.
    pyproject = os.path.join(root, "pyproject.toml")
    if folders and os.path.isfile(pyproject):
        with open(pyproject, encoding="utf-8") as f:
            if 'name = "steppo_fast"' in f.read():
                sys.meta_path.append(_CheckoutSubpackages(folders))


_map_checkout_subpackages()

from . import advantages, losses, ops, reference  # noqa: E402
from .advantages import compute as compute_advantages  # noqa: E402
from .layout import StepLayout  # noqa: E402
from .logprob import linear_cross_entropy, linear_token_logprobs, token_logprobs  # noqa: E402
from .losses import LossConfig, StepPOLoss, linear_steppo_loss, policy_loss, value_loss  # noqa: E402
from . import vocab_parallel  # noqa: E402
from .vocab_parallel import linear_steppo_loss as vocab_parallel_linear_steppo_loss  # noqa: E402
from .vocab_parallel import linear_token_logprobs as vocab_parallel_linear_token_logprobs  # noqa: E402
from .vocab_parallel import token_logprobs as vocab_parallel_token_logprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LossConfig",
    "StepLayout",
    "StepPOLoss",
    "advantages",
    "compute_advantages",
    "linear_cross_entropy",
    "linear_steppo_loss",
    "linear_token_logprobs",
    "losses",
    "ops",
    "policy_loss",
    "reference",
    "token_logprobs",
    "value_loss",
    "vocab_parallel",
    "vocab_parallel_linear_steppo_loss",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_token_logprobs",
]
