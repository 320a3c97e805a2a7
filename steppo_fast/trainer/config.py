"""The trainer's configuration: one flat dataclass, loadable from YAML, overridable by flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

# Estimators the trainer offers (reinforce_pp_baseline stays an op-level option).
TRAIN_ESTIMATORS = ("step_gae", "token_gae", "grpo", "rloo", "gigpo", "reinforce_pp")
# Estimators that need a critic.
CRITIC_ESTIMATORS = ("step_gae", "token_gae")

# The tiny policy built from a config in code when no model path is given (a Qwen2).
TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults train the quick task with StepPO.

    Batch: each update samples ``groups`` tasks and ``group_size`` episodes of each (a GRPO
    group shares the task's environment seed), split over data-parallel ranks.
    """

    env: str = "lights"
    env_kwargs: Dict[str, Any] = field(default_factory=dict)
    estimator: str = "step_gae"
    # Model: None builds the tiny Qwen2 of TINY_MODEL (overridden by model_config); a path
    # loads a local HF causal LM and its tokenizer.
    model: Optional[str] = None
    model_config: Dict[str, Any] = field(default_factory=dict)
    critic: str = "separate"  # "separate" backbone or "shared" with the policy
    attn_implementation: str = "auto"  # auto: flash_attention_2 on a GPU when installed, else sdpa
    # Rollout
    updates: int = 60
    groups: int = 16
    group_size: int = 4
    max_new_tokens: Optional[int] = None  # tokens per step; None: the env's max_action_words + 1, or 16
    temperature: float = 1.0
    full_vocab: bool = False  # ignore the env's action_words and sample from the whole vocabulary
    # Credit assignment
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    gigpo_step_weight: float = 1.0
    # Update
    loss: Dict[str, Any] = field(default_factory=dict)  # LossConfig fields over the estimator's preset
    ppo_epochs: int = 2
    minibatches: int = 2
    lr: float = 2e-3
    critic_lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    vf_coef: float = 0.5
    value_clip: float = 0.5
    # Operations
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU; or "fp32", "bf16"
    out_dir: str = "runs/steppo"
    save_every: int = 10
    eval_episodes: int = 64
    progress: bool = True
    log_every: int = 1  # a metrics line every this many updates (the JSONL file gets every update)
    backend: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.estimator not in TRAIN_ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of: {', '.join(TRAIN_ESTIMATORS)}")
        from .envs import names

        if self.env not in names():
            raise ValueError(f"unknown environment {self.env!r}; choose one of: {', '.join(names())}")
        if self.critic not in ("separate", "shared"):
            raise ValueError(f"critic must be 'separate' or 'shared', got {self.critic!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("updates", "groups", "group_size", "ppo_epochs", "minibatches", "save_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "lr", "critic_lr", "max_grad_norm", "value_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.groups * self.group_size < self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) exceeds the episodes per update "
                             f"({self.groups * self.group_size})")

    @property
    def needs_critic(self) -> bool:
        return self.estimator in CRITIC_ESTIMATORS

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(d))

    @classmethod
    def load(cls, path: str, **overrides) -> "TrainConfig":
        """A config from a YAML file, with ``overrides`` (e.g. from command-line flags) on top."""
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(d).__name__}")
        return cls.from_dict({**d, **overrides})
