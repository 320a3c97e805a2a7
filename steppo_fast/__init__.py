"""steppo_fast: fast, exact StepPO training math.

Importing the package initialises no GPU and builds nothing: compiled modules and
Triton kernels load on first use.
"""

from . import advantages, losses, ops, reference
from .advantages import compute as compute_advantages
from .layout import StepLayout
from .logprob import linear_cross_entropy, linear_token_logprobs, token_logprobs
from .losses import LossConfig, StepPOLoss, linear_steppo_loss, policy_loss, value_loss

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
]
