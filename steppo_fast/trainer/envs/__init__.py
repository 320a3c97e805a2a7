"""Built-in text environments for the trainer, behind one small protocol.

An :class:`Environment` is a multi-step text task: ``reset(seed)`` returns the first
observation; ``step(action)`` takes the agent's whole response for the turn and returns
``(observation, reward, done)``. Implement these two methods for your own task.

Built in (no network, no downloads):

* ``lights``: the quick task. Each turn shows a traffic light; the agent answers ``go`` or
  ``stop``. An episode has 3-8 turns (short ones more likely); reward 1 at the end only if
  every answer was right. A uniformly random policy succeeds about 6% of the time.
* ``hotpot``: multi-hop retrieval QA in miniature. An in-memory knowledge base of facts, a
  ``search <entity>`` tool whose result is the next observation, an ``answer <entity>``
  action, exact-match terminal reward, questions of 2 or 3 hops.
* ``relay``: long free-form steps. Each turn the agent writes a response of 8-40 tokens (a
  budget the environment draws per turn) whose first call word (``go`` / ``stop``) answers the
  light shown; an episode needs 3-7 right calls and allows one miss (3-8 turns), reward 1 at the
  end on success.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from .base import Environment, StepResult
from .hotpot import HotpotEnv
from .lights import LightsEnv
from .relay import RelayEnv

ENVIRONMENTS: Dict[str, Callable[..., Environment]] = {"lights": LightsEnv, "hotpot": HotpotEnv, "relay": RelayEnv}

__all__ = ["ENVIRONMENTS", "Environment", "HotpotEnv", "LightsEnv", "RelayEnv", "StepResult", "make_env", "names",
           "register"]


def names() -> List[str]:
    """Names of the built-in environments."""
    return sorted(ENVIRONMENTS)


def register(name: str, factory: Callable[..., Environment]) -> None:
    """Make your own environment trainable by name (``TrainConfig(env=name)``, ``--env name``).

    ``factory(**env_kwargs)`` must return a new instance following :class:`Environment`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (a class or function), got {type(factory).__name__}")
    ENVIRONMENTS[name] = factory


def make_env(name: str, **kwargs) -> Environment:
    """A built-in environment by name; an unknown name is a ValueError listing the choices."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; choose one of: {', '.join(names())}")
    return ENVIRONMENTS[name](**kwargs)
