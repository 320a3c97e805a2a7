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

    Optional, used by the trainer when present:

    * ``vocabulary() -> list of str``: every word of the task's texts, from which the trainer
      builds a word-level tokenizer in code (without it, give a model path with a tokenizer).
    * ``action_words``: the words a response may use. The policy then samples from those
      tokens (and end-of-step) only, and the training log-probs use the same restricted head,
      so the ratio stays exact. Without it the policy samples from the whole vocabulary.
    * ``max_action_words``: words in the longest action; the default tokens per step is one
      more (for end-of-step), or as many without end-of-step.
    * ``response_budget``: read before each turn, the most tokens (end-of-step included) the
      agent may write in it; the response is cut there (never beyond the trainer's tokens per step).
    * ``end_of_step = False`` (with ``action_words``): the policy never samples end-of-step, so
      every response runs to its budget; the restricted head then leaves it out.
    """

    max_steps: int

    def reset(self, seed: Optional[int] = None) -> str:
        ...

    def step(self, action: str) -> StepResult:
        ...
