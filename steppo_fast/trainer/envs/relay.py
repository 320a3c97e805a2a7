"""``relay``: long free-form steps. Each turn the agent writes 8-40 tokens about a signal light.

The task exists to make steps long: every response is a free-form text of 8-40 tokens, so
step-level and token-level credit assignment differ (a token critic values every
half-written response, token GAE with lambda < 1 decays credit inside a response, a token
ratio weighs every token on its own).

Each turn the observation shows a signal light, ``red`` or ``green``, after the feedback on the
previous turn (``right``, ``wrong``, ``no call``). The agent answers with a free-form sequence of
the task's words, thought words (``hmm so well then``) and the two call words ``go`` and ``stop``,
exactly as long as the turn's *token budget*: drawn uniformly from 8..40 for every turn
(``response_budget``) and never shown to the agent. The task has no end-of-step token
(``end_of_step = False``): a response always runs to its budget, so step lengths vary from
turn to turn and from episode to episode whatever the policy does. The first call word of the
response is binding: the call is right when it is ``stop`` for red and ``go`` for green; later
words are the agent's own business. A response without a call word is malformed: it counts as
a miss, and the next observation says ``no call``.

An episode needs ``m`` right calls, m drawn uniformly from ``calls`` (default 3..7), and allows
one miss: it ends with reward 1 at the m-th right call, or with reward 0 after ``m + 1`` turns
(the turn limit, never shown). Episodes therefore have 3-8 turns, and the reward comes only at
the end. By hand (:func:`success_probability`, :func:`uniform_token_call_probability`):

* a policy whose responses hold a uniformly random first call is right with p = 1/2 each turn
  and succeeds with probability mean_m (m + 2) / 2^(m + 1) = 14.1%; so does a policy that
  always makes the same call, ignoring the light;
* a policy sampling the task's words uniformly (a randomly initialised model with the
  restricted head) has a call in its response unless all of its B words are thought words,
  probability (2/3)^B, and is right with p = 0.498 each turn: it succeeds 14.0% of the time.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from .base import StepResult

THOUGHT_WORDS = ("hmm", "so", "well", "then")
CALLS = {"red": "stop", "green": "go"}
CALL_WORDS = ("go", "stop")
FEEDBACK = {"right": "right", "wrong": "wrong", "none": "no call"}
BUDGETS = (8, 40)  # the turn's token budget is uniform on this closed range


def success_probability(p: float, calls: Sequence[int] = tuple(range(3, 8))) -> float:
    """Success of a policy right with probability ``p`` on every turn, independently:
    mean over m in ``calls`` of P(at least m right of m + 1) = p^m (p + (m + 1)(1 - p))."""
    return sum(p ** m * (p + (m + 1) * (1 - p)) for m in calls) / len(calls)


def uniform_token_call_probability(thought_words: int = len(THOUGHT_WORDS), budgets: Sequence[int] = BUDGETS) -> float:
    """P(right call) in one turn of a policy drawing each of the B words of its response uniformly
    from the thought words and the two call words, B uniform on ``budgets``: the response has a
    call unless every word is a thought word, and its first call is right with probability 1/2,
    so p = mean_B (1 - (T / (T + 2))^B) / 2."""
    lo, hi = budgets
    t = thought_words / (thought_words + len(CALL_WORDS))
    return sum((1 - t ** b) / 2 for b in range(lo, hi + 1)) / (hi - lo + 1)


class RelayEnv:
    """Call the light in 8-40 tokens (see the module docstring)."""

    # Optional protocol attributes (see base.Environment): the words a response may use, no
    # end-of-step token (a response runs to its budget), the most words of a response.
    action_words = (*THOUGHT_WORDS, *CALL_WORDS)
    end_of_step = False
    max_action_words = BUDGETS[1]

    def __init__(self, calls: Sequence[int] = (3, 4, 5, 6, 7), budgets: Sequence[int] = BUDGETS):
        budgets = tuple(budgets)
        if (len(budgets) != 2 or any(not isinstance(b, int) or isinstance(b, bool) for b in budgets)
                or not 1 <= budgets[0] <= budgets[1]):
            raise ValueError(f"budgets must be two integers 1 <= low <= high, got {budgets!r}")
        calls = tuple(calls)
        if not calls or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in calls):
            raise ValueError(f"calls must be a non-empty list of integers >= 1, got {calls!r}")
        self.calls = calls
        self.budgets = budgets
        self.max_action_words = budgets[1]
        self.max_steps = max(calls) + 1
        self._rng = random.Random()
        self._lights = []
        self._budgets = []
        self._need = 0
        self._right = 0
        self._t = 0

    @staticmethod
    def vocabulary():
        """Every word an observation or a response can contain (for tokenizers built in code)."""
        feedback = [w for f in FEEDBACK.values() for w in f.split()]
        return ["light", "red", "green", *dict.fromkeys(feedback), *THOUGHT_WORDS, *CALL_WORDS]

    @property
    def response_budget(self) -> int:
        """Tokens the agent writes this turn: the trainer cuts the response there."""
        return self._budgets[min(self._t, len(self._budgets) - 1)] if self._budgets else self.budgets[1]

    def reset(self, seed: Optional[int] = None) -> str:
        if seed is not None:
            self._rng.seed(seed)
        self._need = self._rng.choice(self.calls)
        turns = self._need + 1
        self._lights = [self._rng.choice(("red", "green")) for _ in range(turns)]
        self._budgets = [self._rng.randint(*self.budgets) for _ in range(turns)]
        self._right = 0
        self._t = 0
        return f"light {self._lights[0]}"

    def judge(self, response: str) -> str:
        """The feedback key of ``response`` for the current light: right, wrong or none (no call)."""
        call = next((w for w in response.split() if w in CALL_WORDS), None)
        if call is None:
            return "none"
        return "right" if call == CALLS[self._lights[self._t]] else "wrong"

    def step(self, action: str) -> StepResult:
        if self._t >= len(self._lights) or self._right >= self._need:
            raise RuntimeError("step() after the episode ended: call reset()")
        verdict = self.judge(action)
        self._right += verdict == "right"
        self._t += 1
        if self._right == self._need:
            return StepResult("", 1.0, True)
        if self._t == len(self._lights):  # the turn limit: m + 1 turns
            return StepResult("", 0.0, True)
        return StepResult(f"{FEEDBACK[verdict]} light {self._lights[self._t]}", 0.0, False)
