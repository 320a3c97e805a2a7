"""The one registry of steppo_fast ops, one module per family of SPEC.

Every public op is a ``torch.library.custom_op("steppo_fast::<op>")`` with a fake
kernel (so it traces under ``torch.compile`` and passes ``opcheck``) and, where it is
differentiable, a registered autograd formula. Its implementation picks a backend by
the tensors' device:

=======  ================================  ==========
device   first choice                      fallback
=======  ================================  ==========
CUDA     ``triton`` or ``cuda`` (per op)   reference
CPU      ``cpp``                           reference
=======  ================================  ==========

``backend=`` on the call, else the ``STEPPO_FAST_BACKEND`` environment variable,
overrides the choice. A backend that is not available for an op falls back to the
reference with one warning per (op, backend); an unknown name is an error.

The functions here take raw tensors. The layout-aware fronts live in
``advantages.py``, ``losses.py`` and ``logprob.py``.

The package is split by SPEC section, one file per family, each holding its ops' schemas,
fakes, backends and autograd formulas:

==================  ==========================================================
``_registry``       backend registration and dispatch, shared by all families
``logprob``         SPEC 2: ``token_logprobs`` (+ backward) from logits
``linear_head``     SPEC 2 and 7 from hidden states and the lm_head weight
``credit``          SPEC 3-6: step rewards, GAE, whitening, group advantages
``losses``          SPEC 7-8: policy loss, value loss
==================  ==========================================================
"""

from ._registry import (BACKENDS, _IMPLS, _warned, available_backends, register_backend,  # noqa: F401
                        registered_ops, resolve_backend)
from .logprob import row_geometry, token_logprobs  # noqa: F401
from .losses import AGG_CODES, KL_CODES, POLICY_METRICS, policy_loss, value_loss  # noqa: F401
from .linear_head import linear_policy_loss, linear_token_logprobs  # noqa: F401
from .credit import (GROUP_NORMS, SINGLETONS, WHITEN_MODES, broadcast_to_tokens, group_advantage,  # noqa: F401
                     step_gae, step_rewards, token_gae, whiten)
from ._guards import check_index_errors, index_errors  # noqa: F401

__all__ = [
    "AGG_CODES", "BACKENDS", "GROUP_NORMS", "KL_CODES", "POLICY_METRICS", "SINGLETONS", "WHITEN_MODES",
    "available_backends", "broadcast_to_tokens", "check_index_errors", "group_advantage", "index_errors",
    "linear_policy_loss", "linear_token_logprobs",
    "policy_loss", "register_backend", "registered_ops", "resolve_backend", "row_geometry", "step_gae",
    "step_rewards", "token_gae", "token_logprobs", "value_loss", "whiten",
]
