"""``hotpot``: multi-hop retrieval QA in miniature (the paper's task family).

An in-memory knowledge base links people to birth cities, cities to countries and countries to
languages. A question needs 2 hops ("which country was ann born in") or 3 ("which language is
spoken where ann was born"). Actions are ``search <entity>`` (the entity's fact becomes the next
observation) and ``answer <entity>`` (ends the episode: reward 1 on an exact match, else 0). Entities are
single words, so the word after the verb is the argument and later words are ignored.
The knowledge base's size is a parameter: the default (6 people, 4 cities, 3 countries with
a language each) keeps guessing unrewarding enough that searching pays, yet lets a tiny model
trained from scratch find its first rewards. A malformed action or an unknown entity gives a penalty observation and costs the turn; after
``max_steps`` turns without an answer the episode ends with reward 0.
"""

from __future__ import annotations

import random
from typing import Dict, Optional, Tuple

from .base import StepResult

PEOPLE = ("ann", "bob", "cid", "dee", "eve", "fay", "gus", "hal", "ida", "jon", "kim", "lea")
CITIES = ("arlo", "bree", "cove", "dale", "elm", "fenn", "glen", "holt")
COUNTRIES = ("norland", "sudia", "estia", "westmark")
LANGUAGES = ("norse", "sudic", "estic", "westish")


class HotpotEnv:
    """Multi-hop retrieval QA over a knowledge base drawn from ``kb_seed``."""

    def __init__(self, kb_seed: int = 0, max_steps: int = 5, people: int = 6, cities: int = 4, countries: int = 3):
        if max_steps < 4:
            raise ValueError(f"max_steps must be >= 4 (3 searches and an answer), got {max_steps}")
        for name, n, pool in (("people", people, PEOPLE), ("cities", cities, CITIES),
                              ("countries", countries, COUNTRIES)):
            if not isinstance(n, int) or not 1 <= n <= len(pool):
                raise ValueError(f"{name} must be an integer in 1..{len(pool)}, got {n!r}")
        self.max_steps = max_steps
        rng = random.Random(kb_seed)
        countries_ = list(COUNTRIES[:countries])
        langs = list(LANGUAGES[:countries])
        rng.shuffle(langs)
        cities_ = CITIES[:cities]
        people_ = PEOPLE[:people]
        self.city_country = {c: rng.choice(countries_) for c in cities_}
        self.country_language = dict(zip(countries_, langs))
        self.person_city = {p: rng.choice(cities_) for p in people_}
        self.facts: Dict[str, str] = {}
        for p, c in self.person_city.items():
            self.facts[p] = f"{p} was born in {c}"
        for c, k in self.city_country.items():
            self.facts[c] = f"{c} is in {k}"
        for k, lang in self.country_language.items():
            self.facts[k] = f"people in {k} speak {lang}"
        entities = (*people_, *cities_, *countries_, *LANGUAGES[:countries])
        # Optional protocol attributes (see base.Environment).
        self.action_words = ("search", "answer", *entities)
        self.max_action_words = 2
        self._rng = random.Random()
        self._answer = ""
        self._question = ""
        self._t = 0
        self._done = True

    def vocabulary(self):
        """Every word an observation or an action can contain (for tokenizers built in code)."""
        words = ["question", "which", "country", "was", "born", "in", "language", "is", "spoken", "where",
                 "result", "nothing", "found", "for", "people", "speak", "invalid", "action", "use", "or",
                 "<entity>", "search", "answer"]
        return words + [w for w in self.action_words if w not in words]

    def question(self, person: str, hops: int) -> Tuple[str, str]:
        """(question text, answer) about ``person`` with 2 or 3 hops."""
        country = self.city_country[self.person_city[person]]
        if hops == 2:
            return f"question which country was {person} born in", country
        if hops == 3:
            return f"question which language is spoken where {person} was born", self.country_language[country]
        raise ValueError(f"hops must be 2 or 3, got {hops}")

    def reset(self, seed: Optional[int] = None) -> str:
        if seed is not None:
            self._rng.seed(seed)
        person = self._rng.choice(sorted(self.person_city))
        self._question, self._answer = self.question(person, self._rng.choice((2, 3)))
        self._t = 0
        self._done = False
        return self._question

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self._t += 1
        words = action.strip().split()
        verb, arg = (words[0], words[1]) if len(words) > 1 else (" ".join(words), "")
        if verb == "answer" and arg:
            self._done = True
            return StepResult("", 1.0 if arg == self._answer else 0.0, True)
        if self._t >= self.max_steps:
            self._done = True
            return StepResult("", 0.0, True)
        if verb == "search" and arg:
            fact = self.facts.get(arg)
            return StepResult(f"result {fact}" if fact else f"result nothing found for {arg}", 0.0, False)
        return StepResult("invalid action use search <entity> or answer <entity>", 0.0, False)
