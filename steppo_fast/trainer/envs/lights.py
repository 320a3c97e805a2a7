"""``lights``: the quick task a tiny randomly initialised model learns on a CPU in minutes.

Each turn the observation is ``light red`` or ``light green``; the right answer is ``stop``
or ``go``. The episode has K turns, K in 3..8 with short episodes more likely (weights below),
and pays 1 at the end only if every answer was right (sparse terminal reward). Any other
response counts as wrong, and the next observation says so. A uniformly random choice between
the two answers succeeds with probability sum_K P(K) 2^-K = 6.1%.
"""

from __future__ import annotations

import random
from typing import Optional

from .base import StepResult

LENGTHS = (3, 4, 5, 6, 7, 8)
LENGTH_WEIGHTS = (0.30, 0.25, 0.15, 0.10, 0.10, 0.10)
ANSWERS = {"red": "stop", "green": "go"}


def random_success_probability() -> float:
    """The success rate of a policy answering go / stop uniformly at random."""
    return sum(w * 0.5 ** k for k, w in zip(LENGTHS, LENGTH_WEIGHTS))


class LightsEnv:
    """The quick task (see the module docstring)."""

    max_steps = max(LENGTHS)
    actions = ("go", "stop")
    # Optional protocol attributes (see base.Environment): the words a response may use and
    # how many of them an action needs.
    action_words = actions
    max_action_words = 1

    def __init__(self):
        self._rng = random.Random()
        self._lights = []
        self._t = 0
        self._all_right = True

    @staticmethod
    def vocabulary():
        """Every word an observation or an action can contain (for tokenizers built in code)."""
        return ["light", "red", "green", "invalid", "answer;", *LightsEnv.actions]

    def reset(self, seed: Optional[int] = None) -> str:
        if seed is not None:
            self._rng.seed(seed)
        k = self._rng.choices(LENGTHS, LENGTH_WEIGHTS)[0]
        self._lights = [self._rng.choice(("red", "green")) for _ in range(k)]
        self._t = 0
        self._all_right = True
        return f"light {self._lights[0]}"

    def step(self, action: str) -> StepResult:
        if self._t >= len(self._lights):
            raise RuntimeError("step() after the episode ended: call reset()")
        words = action.strip().split()
        answer = words[0] if words else ""
        right = answer == ANSWERS[self._lights[self._t]]
        self._all_right &= right
        self._t += 1
        if self._t == len(self._lights):
            return StepResult("", 1.0 if self._all_right else 0.0, True)
        prefix = "" if answer in self.actions else "invalid answer; "
        return StepResult(f"{prefix}light {self._lights[self._t]}", 0.0, False)
