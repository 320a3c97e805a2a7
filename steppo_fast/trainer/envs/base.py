"""The text environment protocol."""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable


class StepResult(NamedTuple):
    """What ``Environment.step`` returns."""

    observation: str  # shown to the agent before its next turn ("" when done)
    reward: float  # this step's reward (built-in tasks pay only at the end)
    done: bool  # the episode is over


@runtime_checkable
class Environment(Protocol):
    """A multi-step text task. One instance runs one episode at a time.

    ``reset`` starts an episode and returns its first observation; ``step`` takes the
    agent's whole response for the turn (free text: a malformed action must give a
    penalty observation, never an exception) and returns a :class:`StepResult`.
    ``max_steps`` bounds an episode's turns.
    """

    max_steps: int

    def reset(self, seed: Optional[int] = None) -> str:
        ...

    def step(self, action: str) -> StepResult:
        ...
