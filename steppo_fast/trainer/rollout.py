"""Rollout: episodes of variable length played in a batch, one generated response per step.

Each turn, the contexts of all unfinished episodes are left-padded into one batch, the
backbone reads them once (prefill) and the response is decoded token by token with the KV
cache, at the sampling temperature, up to ``max_new_tokens`` or end-of-step. The result is
packed into one row per trajectory (observations, responses, observations, ...), which
``Batch`` turns into a :class:`~steppo_fast.StepLayout`.
"""

from __future__ import annotations

import contextlib
import inspect
import zlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..layout import StepLayout


@dataclass
class Episode:
    """One trajectory: its packed tokens, which step each token belongs to, and per-step data."""

    group: int
    seed: int
    tokens: List[int] = field(default_factory=list)
    step_ids: List[int] = field(default_factory=list)  # -1 on observation tokens, k on step k's
    rewards: List[float] = field(default_factory=list)  # per step
    anchors: List[int] = field(default_factory=list)  # per step: key of the observation it answered
    actions: List[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def score(self) -> float:
        return float(sum(self.rewards))

    @property
    def num_steps(self) -> int:
        return len(self.rewards)


def anchor_key(observation: str) -> int:
    """GiGPO's anchor-state key of an observation: a stable 31-bit hash of its text."""
    return zlib.crc32(observation.encode()) & 0x7FFFFFFF


class Sampler:
    """Samples step responses from the policy with the KV cache.

    ``allowed`` (A,) restricts sampling to those token ids (the env's action words and
    end-of-step): the head is then the lm_head's rows of those ids, the same head the loss uses.
    """

    def __init__(self, model, tokenizer, allowed: Optional[Tensor], max_new_tokens: int, temperature: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.tokenizer = tokenizer
        self.allowed = allowed
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.autocast = autocast
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def head(self):
        """(weight, bias) of the sampling head: the lm_head, or its rows of the allowed tokens."""
        lm = self.model.lm_head
        w, b = lm.weight, getattr(lm, "bias", None)
        if self.allowed is not None:
            w = w.index_select(0, self.allowed)
            b = None if b is None else b.index_select(0, self.allowed)
        return w, b

    @torch.no_grad()
    def generate(self, contexts: Sequence[List[int]], generator: torch.Generator) -> List[List[int]]:
        """One response per context: token ids up to and including end-of-step (or the limit)."""
        device = self.model.lm_head.weight.device
        B, L = len(contexts), max(len(c) for c in contexts)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, L - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, L - len(c):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        backbone = self.model.backbone()
        # transformers renamed past_key_values to cache (argument and output field) in 5.x.
        cache_name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        w, b = self.head()
        w = w.float()
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        out_tokens = []
        with self.autocast():
            out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for i in range(self.max_new_tokens):
            h = out.last_hidden_state[:, -1].float()
            logits = h @ w.t()
            if b is not None:
                logits = logits + b.float()
            probs = torch.softmax(logits / self.temperature, dim=-1)
            pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tok = self.allowed[pick] if self.allowed is not None else pick
            tok = torch.where(finished, torch.full_like(tok, self.pad), tok)
            out_tokens.append(tok)
            finished = finished | (tok == self.eos)
            if i + 1 == self.max_new_tokens or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            with self.autocast():
                out = backbone(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                               use_cache=True, **{cache_name: getattr(out, cache_name)})
        toks = torch.stack(out_tokens, dim=1).tolist()
        responses = []
        for row in toks:
            r = []
            for t in row:
                r.append(t)
                if t == self.eos:
                    break
            responses.append(r)
        return responses

    def decode(self, response: List[int]) -> str:
        body = response[:-1] if response and response[-1] == self.eos else response
        return self.tokenizer.decode(body, skip_special_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []


def play(sampler: Sampler, make_env: Callable[[], object], tasks: Sequence[tuple], group_size: int,
         generator: torch.Generator) -> List[Episode]:
    """Play ``group_size`` episodes of each task ``(group, env_seed)`` in one batch.

    All unfinished episodes generate together at every turn; an episode ends when the
    environment says so or after its ``max_steps`` turns (then marked truncated).
    """
    episodes, envs, last_obs = [], [], []
    for group, seed in tasks:
        for _ in range(group_size):
            env = make_env()
            obs = env.reset(seed)
            ep = Episode(group=group, seed=seed)
            toks = sampler.encode(obs)
            if not toks:
                raise ValueError("the environment's first observation is empty; the policy needs a prompt")
            ep.tokens += toks
            ep.step_ids += [-1] * len(toks)
            episodes.append(ep)
            envs.append(env)
            last_obs.append(obs)
    active = list(range(len(episodes)))
    k = 0
    while active:
        responses = sampler.generate([episodes[i].tokens for i in active], generator)
        still = []
        for i, resp in zip(active, responses):
            ep, env = episodes[i], envs[i]
            action = sampler.decode(resp)
            ep.anchors.append(anchor_key(last_obs[i]))
            ep.tokens += resp
            ep.step_ids += [k] * len(resp)
            ep.actions.append(action)
            obs, reward, done = env.step(action)
            ep.rewards.append(float(reward))
            if not done and k + 1 >= env.max_steps:
                ep.truncated, done = True, True
            if not done:
                toks = sampler.encode(obs)
                ep.tokens += toks
                ep.step_ids += [-1] * len(toks)
                last_obs[i] = obs
                still.append(i)
        active = still
        k += 1
    return episodes


@dataclass
class Batch:
    """Episodes packed for the update, every per-token tensor aligned on the *predicted* token.

    input_ids, attention_mask: (R, L) right-padded rows; labels, step_ids: (R, L - 1), the
    token at position j + 1 and its step (-1: not an agent token); layout over step_ids;
    step_rewards, anchors: (S,) in the layout's step order; scores: (R,).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    step_ids: Tensor
    group: Tensor
    layout: StepLayout
    step_rewards: Tensor
    anchors: Tensor
    scores: Tensor

    @classmethod
    def pack(cls, episodes: Sequence[Episode], pad: int, device) -> "Batch":
        R, L = len(episodes), max(len(e.tokens) for e in episodes)
        ids = torch.full((R, L), pad, dtype=torch.long)
        mask = torch.zeros((R, L), dtype=torch.long)
        sid = torch.full((R, L), -1, dtype=torch.long)
        for i, e in enumerate(episodes):
            n = len(e.tokens)
            ids[i, :n] = torch.tensor(e.tokens)
            mask[i, :n] = 1
            sid[i, :n] = torch.tensor(e.step_ids)
        group = torch.tensor([e.group for e in episodes], dtype=torch.long)
        ids, mask, sid, group = ids.to(device), mask.to(device), sid.to(device), group.to(device)
        labels, step_ids = ids[:, 1:].contiguous(), sid[:, 1:].contiguous()
        layout = StepLayout.from_packed(step_ids, group_id=group)
        rewards = torch.tensor([r for e in episodes for r in e.rewards], dtype=torch.float32, device=device)
        anchors = torch.tensor([a for e in episodes for a in e.anchors], dtype=torch.long, device=device)
        scores = torch.tensor([e.score for e in episodes], dtype=torch.float32, device=device)
        return cls(ids, mask, labels, step_ids, group, layout, rewards, anchors, scores)

    def rows(self, idx: Tensor) -> "Batch":
        """The sub-batch of rows ``idx`` (a minibatch), trimmed to its longest row."""
        mask = self.attention_mask[idx]
        L = int(mask.sum(1).max())
        ids, mask, sid = self.input_ids[idx, :L], mask[:, :L], self.step_ids[idx, :L - 1]
        # Rows of a validated batch: no need to check (and sync) again per minibatch.
        layout = StepLayout.from_packed(sid.contiguous(), group_id=self.group[idx], validate=False)
        return Batch(ids, mask, ids[:, 1:].contiguous(), sid.contiguous(), self.group[idx], layout,
                     self.step_rewards.new_zeros(0), self.anchors.new_zeros(0), self.scores[idx])
