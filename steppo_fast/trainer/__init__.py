"""A thin StepPO trainer: HF causal LMs in multi-step text environments, on steppo_fast's kernels.

``TrainConfig`` holds every setting; ``Trainer(config).train()`` runs rollout -> credit
assignment -> PPO updates (see ``loop.py``); ``envs`` holds the environment protocol and the
built-in tasks. The command line is ``steppo-fast train`` and ``steppo-fast demo``.
"""

from . import envs
from .config import METHODS, TRAIN_ESTIMATORS, TrainConfig, method_settings
from .loop import NonFiniteLoss, Trainer

__all__ = ["METHODS", "NonFiniteLoss", "TRAIN_ESTIMATORS", "TrainConfig", "Trainer", "envs", "method_settings"]
