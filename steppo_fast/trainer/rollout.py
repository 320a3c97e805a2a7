"""Rollout: episodes of variable length played in a batch, one generated response per step.

Every episode keeps its KV cache across turns: a turn appends only what the cache has not
seen yet (the end of the last response and the new observation) instead of re-reading the
whole history. All unfinished episodes decode together, token by token, at the sampling
temperature, up to ``max_new_tokens`` or end-of-step. Rows of one batch have different
lengths, so the cache holds padding columns (attention mask 0) where a row had nothing to
add; position ids count each row's real tokens only, so every token sees exactly the keys
and positions it has when the packed row is read again in one forward pass. The result is
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
    logprobs: List[float] = field(default_factory=list)  # per response token: its sampling log-prob
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

    With an lm_head split over the vocabulary (``trainer.parallel``), ``head_rows`` are the rows
    of this rank's slice that :meth:`head` keeps (this rank's share of ``allowed``, or all of its
    rows) and ``gather`` concatenates every rank's logits over the vocabulary, so each rank samples
    from the whole distribution (the same token on every rank of the group).
    """

    def __init__(self, model, tokenizer, allowed: Optional[Tensor], max_new_tokens: int, temperature: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 head_rows: Optional[Tensor] = None, gather: Optional[Callable[[Tensor], Tensor]] = None):
        self.model = model
        self.head_rows = allowed if head_rows is None else head_rows
        self.gather = gather
        self.tokenizer = tokenizer
        self.allowed = allowed
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.autocast = autocast
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def head(self):
        """(weight, bias) of the sampling head: the lm_head (this rank's slice of it, when split),
        or its rows of the allowed tokens."""
        lm = self.model.lm_head
        w, b = lm.weight, getattr(lm, "bias", None)
        if self.head_rows is not None:
            w = w.index_select(0, self.head_rows)
            b = None if b is None else b.index_select(0, self.head_rows)
        return w, b

    def start(self, rows: int) -> "TurnCache":
        """An empty cross-turn cache for ``rows`` episodes (see :class:`TurnCache`)."""
        return TurnCache(rows, self.model.lm_head.weight.device)

    @torch.no_grad()
    def generate(self, contexts: Sequence[List[int]], generator: torch.Generator) -> List[List[int]]:
        """One response per context, from a fresh cache: token ids up to and including
        end-of-step (or the limit)."""
        return self.respond(self.start(len(contexts)), contexts, generator)

    @torch.no_grad()
    def respond(self, state: "TurnCache", histories: Sequence[List[int]], generator: torch.Generator,
                logprobs: Optional[List[List[float]]] = None,
                limits: Optional[Sequence[int]] = None) -> List[List[int]]:
        """One response per row of ``state``: ``histories[r]`` is row r's whole token history so
        far, of which the cache holds the first ``state.cached[r]``; the rest is read first.

        A response ends at end-of-step or after ``limits[r]`` tokens (default and at most
        ``max_new_tokens``). Appends each response's sampling log-probs to ``logprobs[r]`` when
        given. The last token of each response is not fed yet: the next call reads it with the
        next observation.
        """
        if len(histories) != state.rows:
            raise ValueError(f"histories has {len(histories)} rows but the cache has {state.rows}")
        if limits is None:
            limits = [self.max_new_tokens] * state.rows
        limits = [min(int(x), self.max_new_tokens) for x in limits]
        if len(limits) != state.rows or min(limits) < 1:
            raise ValueError(f"limits must hold one token budget >= 1 per row, got {limits}")
        device = state.device
        pending = [list(h[c:]) for h, c in zip(histories, state.cached)]
        if any(not p for p in pending):
            raise ValueError("every row needs new tokens (an observation or the end of a response) to respond to")
        B, W = state.rows, max(len(p) for p in pending)
        ids = torch.full((B, W), self.pad, dtype=torch.long)
        mask = torch.zeros((B, W), dtype=torch.long)
        pos = torch.zeros((B, W), dtype=torch.long)
        for r, p in enumerate(pending):
            n, c = len(p), state.cached[r]
            ids[r, W - n:] = torch.tensor(p, dtype=torch.long)
            mask[r, W - n:] = 1
            pos[r, W - n:] = torch.arange(c, c + n)
            state.cached[r] = c + n
        next_pos = torch.tensor(state.cached, dtype=torch.long, device=device)
        backbone = self.model.backbone()
        # transformers renamed past_key_values to cache (argument and output field) in 5.x.
        cache_name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        w, b = self.head()
        dt = torch.promote_types(w.dtype, torch.float32)  # fp32 logits, fp64 for an fp64 model
        w = w.to(dt)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        out_tokens, out_logp = [], []

        def feed(tokens: Tensor, new_mask: Tensor, positions: Tensor):
            state.mask = new_mask if state.mask is None else torch.cat([state.mask, new_mask], dim=1)
            kw = {} if state.cache is None else {cache_name: state.cache}
            with self.autocast():
                out = backbone(input_ids=tokens, attention_mask=state.mask, position_ids=positions,
                               use_cache=True, **kw)
            state.cache = getattr(out, cache_name)
            return out.last_hidden_state[:, -1].to(dt)

        h = feed(ids.to(device), mask.to(device), pos.to(device))
        limit = torch.tensor(limits, dtype=torch.long, device=device)
        length = torch.zeros(B, dtype=torch.long, device=device)
        for i in range(max(limits)):
            logits = h @ w.t()
            if b is not None:
                logits = logits + b.to(dt)
            if self.gather is not None:
                logits = self.gather(logits)
            logp = torch.log_softmax(logits / self.temperature, dim=-1)
            pick = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            live = ~finished
            tok = self.allowed[pick] if self.allowed is not None else pick
            tok = torch.where(live, tok, torch.full_like(tok, self.pad))
            out_tokens.append(tok)
            out_logp.append(logp.gather(1, pick[:, None]).squeeze(1))
            length = length + live.long()
            finished = finished | (tok == self.eos) | (length >= limit)
            if bool(finished.all()):
                break
            # Feed this token to the rows that sampled it; the others get a masked column.
            h = feed(tok[:, None], live[:, None].long(), next_pos[:, None])
            next_pos = next_pos + live.long()
        toks = torch.stack(out_tokens, dim=1).tolist()
        lps = torch.stack(out_logp, dim=1).tolist()
        fed, lengths = next_pos.tolist(), length.tolist()
        responses = []
        for r, (row, lp) in enumerate(zip(toks, lps)):
            n = lengths[r]
            responses.append(row[:n])
            if logprobs is not None:
                logprobs[r].extend(lp[:n])
            state.cached[r] = fed[r]
        return responses

    def decode(self, response: List[int]) -> str:
        body = response[:-1] if response and response[-1] == self.eos else response
        return self.tokenizer.decode(body, skip_special_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []


class TurnCache:
    """The KV cache of a batch of episodes across turns.

    ``cache``: the backbone's cache (None before the first turn), ``mask``: (rows, columns) long,
    1 where a column holds one of the row's tokens and 0 on padding; ``cached[r]``: how many of
    row r's tokens the cache holds, which is also the position id of its next token.
    """

    def __init__(self, rows: int, device):
        self.rows = rows
        self.device = device
        self.cache = None
        self.mask: Optional[Tensor] = None
        self.cached = [0] * rows

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the current rows, in the new order); drop the others."""
        rows = list(rows)
        if rows == list(range(self.rows)):
            return
        if rows and self.cache is not None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.cache.reorder_cache(idx)
            self.mask = self.mask.index_select(0, idx)
        self.cached = [self.cached[r] for r in rows]
        self.rows = len(rows)


def play(sampler: Sampler, make_env: Callable[[], object], tasks: Sequence[tuple], group_size: int,
         generator: torch.Generator) -> List[Episode]:
    """Play ``group_size`` episodes of each task ``(group, env_seed)`` in one batch.

    All unfinished episodes generate together at every turn, each on its own cached history and
    within its environment's ``response_budget`` for the turn when it has one; an episode ends
    when the environment says so or after its ``max_steps`` turns (then marked truncated).
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
    state = sampler.start(len(active))
    k = 0
    while active:
        lps: List[List[float]] = [[] for _ in active]
        limits = [getattr(envs[i], "response_budget", sampler.max_new_tokens) for i in active]
        responses = sampler.respond(state, [episodes[i].tokens for i in active], generator, lps, limits)
        still = []
        for j, (i, resp) in enumerate(zip(active, responses)):
            ep, env = episodes[i], envs[i]
            action = sampler.decode(resp)
            ep.anchors.append(anchor_key(last_obs[i]))
            ep.tokens += resp
            ep.step_ids += [k] * len(resp)
            ep.logprobs += lps[j]
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
                still.append(j)
        state.keep(still)
        active = [active[j] for j in still]
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
