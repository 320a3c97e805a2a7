"""The trainer's configuration: one flat dataclass, loadable from YAML, overridable by flags."""

from __future__ import annotations

import dataclasses
import numbers
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

# Estimators the trainer offers (reinforce_pp_baseline stays an op-level option).
TRAIN_ESTIMATORS = ("step_gae", "token_gae", "grpo", "rloo", "gigpo", "reinforce_pp")
# Estimators that need a critic.
CRITIC_ESTIMATORS = ("step_gae", "token_gae")
# The methods StepPO's paper compares, as (estimator, policy-ratio level); a config trains one
# with ``TrainConfig(**method_settings(name))``. An estimator alone gets the ratio of its preset
# (step for step_gae, token otherwise); ``loss: {ratio_level: ...}`` overrides it.
METHODS = {
    "steppo": ("step_gae", "step"),  # step GAE + step ratio
    "ppo": ("token_gae", "token"),  # token GAE + token ratio
    "grpo": ("grpo", "token"),
    "rloo": ("rloo", "token"),
    "reinforce_pp": ("reinforce_pp", "token"),
    "gigpo": ("gigpo", "token"),
    "gspo": ("grpo", "step"),  # GRPO advantages + step (sequence) ratio
    "step_gae_token_ratio": ("step_gae", "token"),  # ablation: StepPO without the step ratio
    "token_gae_step_ratio": ("token_gae", "step"),  # ablation: StepPO without step GAE
}


def method_settings(name: str) -> Dict[str, Any]:
    """``{"estimator": ..., "loss": {"ratio_level": ...}}`` of one of :data:`METHODS`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    estimator, ratio = METHODS[name]
    return {"estimator": estimator, "loss": {"ratio_level": ratio}}

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
    # Under torchrun: ranks per tensor-parallel group, which splits the lm_head over the
    # vocabulary (trainer/parallel.py); the other ranks are data-parallel.
    tensor_parallel: int = 1
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU; or "fp32", "bf16"
    out_dir: str = "runs/steppo"
    save_every: int = 10
    eval_episodes: int = 64
    progress: bool = True
    log_every: int = 1  # a metrics line every this many updates (the JSONL file gets every update)
    backend: str = "auto"

    def __post_init__(self):
        _coerce_fields(self)
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
        for name in ("updates", "groups", "group_size", "ppo_epochs", "minibatches", "save_every", "log_every",
                     "tensor_parallel"):
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
        _check_device(self.device)
        self.loss = _checked_loss(self.loss)
        if self.model is not None and self.model_config:
            raise ValueError(f"model_config ({self.model_config}) sets up the tiny model built in code; "
                             f"it cannot change the model loaded from {self.model!r}")

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
        return cls.from_dict({**read_config_file(path), **overrides})


# ---------------------------------------------------------------------- reading values
# Settings are read as people write them: YAML numbers with an exponent but no dot (``1e-3``,
# which YAML 1.1 reads as a string) are numbers, and a field declared float or int takes a
# number written as a string (``"0.99"``). Anything else of the wrong type is a ValueError
# naming the key.

_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_LOADER = None


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML (safe), ``1e-3`` read as a float; ``source`` names it in errors."""
    global _LOADER
    import yaml

    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))
        _LOADER = Loader
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ValueError(f"{source} is not valid YAML: {what}{where}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping of config keys in the YAML file ``path`` (an empty file is no keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot read config file {path}: {reason}") from None
    d = parse_yaml(text, f"config file {path}")
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"config file {path}: expected a mapping of config keys, got a {type(d).__name__}")
    return d


def _as_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` of setting ``name`` as the declared type ``hint`` (unknown kinds pass through)."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        return _as_type(name, value, args[0]) if len(args) == 1 else value
    origin = typing.get_origin(hint) or hint
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint is int:
        x = value
        if isinstance(x, str):
            try:
                x = float(x.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(x, numbers.Integral) and not isinstance(x, bool):
            return int(x)
        if isinstance(x, float) and x.is_integer():
            return int(x)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string, got {value!r}")
    if origin in (dict, Dict, Mapping) or origin is typing.Mapping:
        if value is None:  # `key:` with nothing after it in YAML
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{name} must be a mapping (key: value, ...), got {value!r}")
    return value


def _coerce_fields(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            setattr(obj, f.name, _as_type(prefix + f.name, getattr(obj, f.name), hints[f.name]))


def _check_device(device: str) -> None:
    if device == "auto":
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one the trainer runs on: use auto, cpu, cuda or cuda:N")


def _checked_loss(loss: Dict[str, Any]) -> Dict[str, Any]:
    """The ``loss:`` overrides with values of LossConfig's types; bad keys or values name ``loss``."""
    from ..losses import LossConfig

    fields = [f.name for f in dataclasses.fields(LossConfig)]
    unknown = sorted(set(loss) - set(fields))
    if unknown:
        raise ValueError(f"loss has unknown option(s) {', '.join(map(str, unknown))}; "
                         f"LossConfig's options: {', '.join(fields)}")
    hints = typing.get_type_hints(LossConfig)
    out = {k: _as_type(f"loss.{k}", v, hints[k]) for k, v in loss.items()}
    try:
        LossConfig.preset("steppo", **out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loss: {e}") from None
    return out
