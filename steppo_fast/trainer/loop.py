"""The training loop: rollout -> credit assignment -> PPO epochs on the fused kernels.

One update, top to bottom (:meth:`Trainer.update`):

1. ``play``: the batch's episodes, one response per step (``rollout.py``).
2. One no-grad forward over the packed rows: the behaviour log-probs (``linear_token_logprobs``,
   hidden states x lm_head without logits) and the critic's token-aligned values.
3. ``compute_advantages(estimator, layout, ...)``: step GAE reads the values at each step's
   first agent token; whitening uses the statistics of all data-parallel ranks.
4. PPO epochs over shuffled minibatches of trajectories: ``StepPOLoss`` on hidden states and
   the lm_head weight, the clipped value loss at step boundaries, gradient clipping, AdamW.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import advantages as adv_mod
from .. import vocab_parallel
from ..logprob import linear_token_logprobs
from ..losses import LossConfig, StepPOLoss, value_loss
from ..ops import available_backends, resolve_backend
from . import checks, parallel
from .config import TrainConfig
from .models import ActorCritic, attn_implementation, build_policy, build_tokenizer
from .rollout import Batch, Sampler, play

EVAL_SEED_BASE = 1_000_000_007  # evaluation tasks never coincide with training tasks


class NonFiniteLoss(RuntimeError):
    """Training stopped because a loss or gradient became NaN or infinite."""


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (SplitMix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Trainer:
    """A StepPO (or baseline) trainer for one environment; see the module docstring.

    Under ``torchrun`` each data-parallel rank plays ``groups / data-parallel ranks`` of the
    tasks, the model is wrapped in DistributedDataParallel (gloo on the CPU, nccl on GPUs),
    losses are normalised by the global step and token counts so the averaged gradient is the
    global batch's, and rank 0 writes the logs and checkpoints. With ``tensor_parallel = t``
    each group of t consecutive ranks splits the lm_head over the vocabulary and plays the same
    episodes (``trainer.parallel``); there are world / t data-parallel ranks.
    """

    def __init__(self, config: TrainConfig):
        self.cfg = cfg = config
        self.par = parallel.ParallelLayout.create(cfg.tensor_parallel)
        self.world, self.rank, self.dp = self.par.world, self.par.rank, self.par.dp
        if cfg.groups % self.dp:
            what = "processes" if self.par.tp == 1 else "data-parallel ranks (processes / tensor_parallel)"
            raise ValueError(f"groups ({cfg.groups}) must be divisible by the number of {what} ({self.dp})")
        self.local_groups = cfg.groups // self.dp
        if self.local_groups * cfg.group_size < cfg.minibatches:
            raise ValueError(f"minibatches ({cfg.minibatches}) exceeds the episodes per process "
                             f"({self.local_groups * cfg.group_size})")
        self.device = self._device()
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.env_factory = checks.env_factory(cfg.env, cfg.env_kwargs)
        probe = self.env_factory()
        vocab = probe.vocabulary() if hasattr(probe, "vocabulary") else None
        tokenizer = build_tokenizer(vocab) if (vocab is not None and cfg.model is None) else None
        attn = attn_implementation(cfg.attn_implementation, self.device)
        policy, self.tokenizer = build_policy(cfg.model, tokenizer, cfg.model_config, attn, cfg.seed)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: the trainer ends each step at end-of-sequence")
        vocab_rows = policy.get_output_embeddings().weight.shape[0]
        self.split_head = parallel.split_lm_head(policy, self.par) if self.par.tp > 1 else None
        self.model = ActorCritic(policy, cfg.critic if cfg.needs_critic else None, cfg.seed).to(self.device)
        self.allowed = self._allowed_tokens(probe)
        if self.allowed is not None:
            self._label_rows = torch.zeros(vocab_rows, dtype=torch.long, device=self.device)
            self._label_rows[self.allowed] = torch.arange(len(self.allowed), device=self.device)
        eos = int(getattr(probe, "end_of_step", True))
        max_new = cfg.max_new_tokens or (getattr(probe, "max_action_words", 15) + eos)
        head_rows, gather = None, None
        if self.split_head is not None:
            # This rank's rows of the (restricted) head, and the row counts of every rank's.
            sh = self.split_head
            if self.allowed is None:
                head_sizes = sh.sizes
            else:
                ends = torch.tensor(sh.sizes).cumsum(0).tolist()
                starts = [e - n for e, n in zip(ends, sh.sizes)]
                ids = self.allowed.tolist()
                head_sizes = [sum(s <= i < e for i in ids) for s, e in zip(starts, ends)]
                mine = [i - sh.start for i in ids if sh.start <= i < sh.start + sh.size]
                head_rows = torch.tensor(mine, dtype=torch.long, device=self.device)
            gather = lambda z: parallel.gather_last_dim(z, head_sizes, sh.group)  # noqa: E731
        self.sampler = Sampler(self.model, self.tokenizer, self.allowed, max_new, cfg.temperature, self._autocast,
                               head_rows=head_rows, gather=gather)
        self.ddp = None
        if self.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids, process_group=self.par.dp_group)
        groups = [{"params": self.model.policy_parameters(), "lr": cfg.lr}]
        if self.model.critic_parameters():
            groups.append({"params": self.model.critic_parameters(), "lr": cfg.critic_lr})
        self.optim = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        preset = "steppo" if cfg.estimator == "step_gae" else "ppo"
        self.loss_cfg = LossConfig.preset(preset, **cfg.loss)
        self.loss_fn = StepPOLoss(self.loss_cfg, temperature=cfg.temperature, backend=cfg.backend,
                                  process_group=self.par.tp_group)
        # value_loss has only the reference (a few elementwise ops over steps): ask for it by name.
        self.vf_backend = cfg.backend
        if cfg.backend == "auto" and available_backends("value_loss", self.device.type) == ["reference"]:
            self.vf_backend = "reference"
        self.start_update = 0
        self.history: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ set-up
    def _device(self) -> torch.device:
        d = self.cfg.device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(d)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' was requested but no GPU is available")
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(dev)
        return dev

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _allowed_tokens(self, env) -> Optional[torch.Tensor]:
        words = getattr(env, "action_words", None)
        eos = getattr(env, "end_of_step", True)
        if self.cfg.full_vocab or not words:
            if not eos:
                raise ValueError("an environment without end-of-step (end_of_step = False) needs action_words "
                                 "and full_vocab off: the restricted head is what leaves end-of-step out")
            return None
        ids = []
        for w in words:
            t = self.tokenizer.encode(w, add_special_tokens=False)
            if len(t) != 1 or t[0] == self.tokenizer.unk_token_id:
                raise ValueError(f"action word {w!r} is not one token of the tokenizer; use full_vocab")
            ids.append(t[0])
        if eos:
            ids.append(self.tokenizer.eos_token_id)
        return torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ pieces
    def head(self):
        """(weight, bias) the loss reads: the lm_head or its rows of the allowed tokens."""
        return self.sampler.head()

    def head_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Token ids -> rows of :meth:`head` (non-agent positions map to 0; the loss masks them)."""
        if self.allowed is None:
            return labels
        return self._label_rows[labels]

    def forward(self, batch: Batch):
        """hidden (R, L-1, H) predicting each next token, values (R, L-1) or None."""
        module = self.ddp if self.ddp is not None else self.model
        with self._autocast():
            hidden, values = module(batch.input_ids, batch.attention_mask)
        hidden = hidden[:, :-1]
        values = None if values is None else values[:, :-1].float()
        return hidden, values

    def tasks(self, update: int, count: int, base: int = 0):
        """This rank's (group, env seed) pairs for ``update``: a function of the update and the
        data-parallel rank alone (the ranks of a tensor-parallel group play the same tasks)."""
        first = self.par.dp_rank * count
        return [(first + g, _mix(self.cfg.seed, base, update, first + g) % (2 ** 31)) for g in range(count)]

    def generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(_mix(self.cfg.seed, self.par.dp_rank, *key))
        return g

    def _all_sum(self, *xs: float) -> List[float]:
        """Sums over the data-parallel ranks (a tensor-parallel group counts its episodes once)."""
        if self.dp == 1:
            return list(xs)
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.par.dp_group)
        return t.tolist()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, episodes: Optional[int] = None) -> float:
        """Success rate (share of episodes with a positive return) on held-out tasks, sampling at
        the training temperature; all ranks together."""
        n = self.cfg.eval_episodes if episodes is None else episodes
        local = -(-n // self.dp)
        self.model.eval()
        eps = play(self.sampler, self.env_factory, self.tasks(0, local, base=EVAL_SEED_BASE), 1,
                   self.generator(EVAL_SEED_BASE))
        self.model.train()
        won, total = self._all_sum(sum(e.score > 0 for e in eps), len(eps))
        return won / total

    # ------------------------------------------------------------------ one update
    def update(self, u: int) -> Dict[str, float]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        model.eval()
        gen = self.generator(u)
        episodes = play(self.sampler, self.env_factory, self.tasks(u, self.local_groups), cfg.group_size, gen)
        model.train()
        batch = Batch.pack(episodes, self.sampler.pad, self.device)
        t1 = time.perf_counter()
        layout = batch.layout

        with torch.no_grad():
            hidden, values = self.forward(batch)
            w, b = self.head()
            kw = {} if self.split_head is None else {"process_group": self.par.tp_group}
            logprobs = linear_token_logprobs if self.split_head is None else vocab_parallel.linear_token_logprobs
            old_logp, entropy = logprobs(hidden, w.to(hidden.dtype), self.head_labels(batch.labels), layout,
                                         cfg.temperature, None if b is None else b.to(hidden.dtype),
                                         backend=cfg.backend, **kw)
            pg = (self.par.dp_group or True) if self.dp > 1 else None
            adv = adv_mod.compute(cfg.estimator, layout, step_rewards=batch.step_rewards, values=values,
                                  gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten, anchor_keys=batch.anchors,
                                  step_weight=cfg.gigpo_step_weight, process_group=pg, backend=cfg.backend)
        sums = {k: 0.0 for k in ("pg_loss", "vf_loss", "pg_clipfrac", "ppo_kl", "vf_clipfrac", "grad_norm")}
        n_mb = 0
        R = batch.input_ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(R, generator=gen, device=self.device)
            for idx in perm.tensor_split(cfg.minibatches):
                m = self._minibatch(batch, idx, old_logp, adv, values)
                for k in sums:
                    sums[k] += m.get(k, 0.0)
                n_mb += 1
        t2 = time.perf_counter()

        scores = batch.scores
        agent = layout.token_mask
        won, n_eps, steps, ret, toks, ent = self._all_sum(
            float((scores > 0).sum()), float(R), float(layout.num_steps), float(scores.sum()),
            float(agent.sum()), float((entropy.reshape(-1) * agent).sum()))
        out = {"update": u, "episodes": int(n_eps), "world_size": self.world, "success": won / n_eps, "return": ret / n_eps, "steps_per_episode": steps / n_eps,
               "tokens_per_step": toks / steps, "entropy": ent / max(toks, 1.0)}
        means = {k: v / n_mb for k, v in sums.items()}
        if self.dp > 1:
            # pg_loss is normalised by global counts: its sum over ranks is the global loss;
            # the other metrics are local means, averaged over ranks.
            keys = sorted(means)
            tot = self._all_sum(*(means[k] for k in keys))
            means = {k: t if k == "pg_loss" else t / self.dp for k, t in zip(keys, tot)}
        out.update(means)
        out.update({"rollout_s": t1 - t0, "update_s": t2 - t1})
        return out

    def _minibatch(self, batch: Batch, idx: torch.Tensor, old_logp, adv, old_values) -> Dict[str, float]:
        cfg = self.cfg
        mb = batch.rows(idx)
        T = mb.labels.shape[1]
        lay = mb.layout
        o_logp = old_logp[idx, :T]
        a_tok = adv.token_advantages[idx, :T]
        n_steps, n_tok = lay.num_steps, float(lay.num_active_tokens)
        g_steps, g_tok = self._all_sum(float(n_steps), n_tok)
        loss_cfg = self.loss_cfg
        scale = 1.0
        if self.dp > 1:
            # Normalise by the global counts; DDP averages gradients, so scale back by the ranks.
            loss_cfg = replace(loss_cfg, global_num_steps=g_steps, global_num_tokens=g_tok)
            scale = float(self.dp)
        self.loss_fn.config = loss_cfg
        hidden, values = self.forward(mb)
        w, b = self.head()
        pg_loss, metrics = self.loss_fn(hidden, self.head_labels(mb.labels), lay, o_logp, a_tok,
                                        weight=w.to(hidden.dtype), bias=None if b is None else b.to(hidden.dtype))
        loss = pg_loss * scale
        out = {"pg_loss": pg_loss, "pg_clipfrac": metrics["pg_clipfrac"], "ppo_kl": metrics["ppo_kl"]}
        if values is not None:
            ret_tok = adv.token_returns[idx, :T]
            ov_tok = old_values[idx, :T]
            if cfg.estimator == "step_gae":  # the critic is read at step boundaries (SPEC 8)
                v, ov, r = (lay.step_values_from_tokens(x) for x in (values, ov_tok, ret_tok))
                vf, vf_clip = value_loss(v, ov, r, None, cfg.value_clip, backend=self.vf_backend)
                count, g_count = float(n_steps), g_steps
            else:  # token-level PPO: one value per agent token
                msk = lay.token_mask
                vf, vf_clip = value_loss(values.reshape(-1), ov_tok.reshape(-1), ret_tok.reshape(-1), msk,
                                         cfg.value_clip, backend=self.vf_backend)
                count, g_count = n_tok, g_tok
            loss = loss + cfg.vf_coef * vf * (count / g_count * self.dp)
            out.update(vf_loss=vf, vf_clipfrac=vf_clip)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.split_head is not None:  # replicated parameters: the group's first rank's gradients
            parallel.share_replicated_grads(list(self.model.parameters()), self.split_head,
                                            src=self.par.dp_rank * self.par.tp)
        if self.split_head is None:
            gn = torch.nn.utils.clip_grad_norm_(self.model.policy_parameters(), cfg.max_grad_norm)
        else:  # the norm of the whole head, whose slices live on the tensor-parallel group
            gn = parallel.clip_grad_norm(self.model.policy_parameters(), cfg.max_grad_norm, self.split_head)
        if self.model.critic_parameters():
            torch.nn.utils.clip_grad_norm_(self.model.critic_parameters(), cfg.max_grad_norm)
        out["grad_norm"] = gn
        vals = {k: float(v.detach()) for k, v in out.items()}  # host reads once per minibatch
        if not all(math.isfinite(v) for v in vals.values()):
            bad = ", ".join(k for k, v in vals.items() if not math.isfinite(v))
            raise NonFiniteLoss(f"non-finite {bad}")
        self.optim.step()
        return vals

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoint.pt")

    def _whole_states(self):
        """(model state, optimiser state) with a split lm_head gathered whole: a collective over
        the first tensor-parallel group, whose ranks all call it; None on the other ranks."""
        if self.rank != 0 and (self.split_head is None or self.par.dp_rank != 0):
            return None
        model, optim = self.model.state_dict(), self.optim.state_dict()
        if self.split_head is None:
            return model, optim
        return (parallel.whole_state(self.model, self.split_head, model),
                parallel.whole_optim_state(self.optim, self.split_head, optim))

    def save(self, next_update: int) -> None:
        """Write ``checkpoint.pt`` (rank 0; with a split lm_head, the first tensor-parallel group
        gathers it whole first, so every rank of the group must call this)."""
        states = self._whole_states()
        if self.rank != 0:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        state = {
            "update": next_update,
            "config": self.cfg.to_dict(),
            "model": states[0],
            "optim": states[1],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "history": self.history,
        }
        state["checksums"] = checks.checksums(state)  # what load() verifies the tensors against
        tmp = self.ckpt_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # never a half-written checkpoint

    def load(self, path: Optional[str] = None) -> int:
        """Restore model, optimiser, RNG and position from a checkpoint; returns the next update.

        The checkpoint must have been saved under the same ``checks.RUN_IDENTITY`` settings, and
        every tensor must be finite and match its saved checksum (a ValueError names the file and
        the setting or tensor otherwise). Other settings may differ: the optimiser takes this
        config's lr, critic_lr and weight_decay, and a line names every changed setting.
        """
        cfg = self.cfg
        path = path or self.ckpt_path
        state = checks.read_checkpoint(path)
        conflicts, changes = checks.resume_changes(state["config"], cfg)
        if conflicts:
            raise ValueError(f"{path} was saved by a run with other settings ({'; '.join(conflicts)}); resume "
                             f"it with its own settings, or start a new run in another folder")
        update = int(state["update"])
        if update > cfg.updates:
            raise ValueError(f"{path} is at update {update}, past updates={cfg.updates}: give updates >= {update}")
        names = {id(p): n for n, p in self.model.named_parameters()}
        checks.check_restored(state, path, [names[id(p)] for g in self.optim.param_groups for p in g["params"]])
        try:
            model_state, optim_state = state["model"], state["optim"]
            if self.split_head is not None:  # checkpoints hold the whole head: keep this rank's rows
                model_state = parallel.local_state(self.model, self.split_head, model_state)
                optim_state = parallel.local_optim_state(self.optim, self.split_head, optim_state)
            self.model.load_state_dict(model_state)
            self.optim.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{path} does not fit the model of these settings: {' '.join(str(e).split())}") from e
        for group, lr in zip(self.optim.param_groups, (cfg.lr, cfg.critic_lr)):
            group["lr"], group["weight_decay"] = lr, cfg.weight_decay
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.history = list(state["history"])
        self.start_update = update
        if self.rank == 0:
            what = f"changed settings: {', '.join(changes)}" if changes else "with the settings it was saved with"
            print(f"resuming {path} at update {update} of {cfg.updates}; {what}", flush=True)
        return self.start_update

    def save_final(self) -> str:
        """The trained policy and tokenizer in HF format (loadable with ``model: <path>``); a split
        lm_head is saved whole (every rank of the first tensor-parallel group must call this)."""
        path = os.path.join(self.cfg.out_dir, "final")
        state = None
        if self.split_head is not None and self.par.dp_rank == 0:
            policy = self.model.policy
            state = parallel.whole_state(policy, self.split_head, policy.state_dict())
        if self.rank == 0:
            self.model.policy.save_pretrained(path, **({} if state is None else {"state_dict": state}))
            self.tokenizer.save_pretrained(path)
        return path

    # ------------------------------------------------------------------ the run
    def train(self, resume: bool = False, stop_after: Optional[int] = None,
              overwrite: bool = False) -> List[Dict[str, float]]:
        """Run updates ``start .. cfg.updates`` (``stop_after``: stop early, for tests and demos).

        Prints a progress bar and a line per update, appends metrics to ``metrics.jsonl`` and
        saves a checkpoint every ``save_every`` updates and at the end. A non-finite loss stops
        the run with :class:`NonFiniteLoss`; the last checkpoint on disk is the last good state.
        A folder that holds a run is refused unless ``resume`` (continue it) or ``overwrite``
        (remove its files first) is given.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        checks.check_run_folder(cfg.out_dir, resume, overwrite)
        if self.world > 1:
            dist.barrier()  # every rank has looked at the folder before rank 0 changes it
        if resume:
            self.load()
        main = self.rank == 0
        if main:
            removed = checks.prepare_run_folder(cfg.out_dir, overwrite)
            if removed:
                print(f"replacing the run in {cfg.out_dir} (removed {', '.join(removed)})", flush=True)
            self._rewrite_metrics()
        end = cfg.updates if stop_after is None else min(cfg.updates, stop_after)
        bar = tqdm(range(self.start_update, end), total=cfg.updates, initial=self.start_update,
                   disable=not (main and cfg.progress), desc=f"{cfg.env}/{cfg.estimator}", unit="update")
        last_saved = self.start_update if resume else None
        for u in bar:
            try:
                m = self.update(u)
            except NonFiniteLoss as e:
                where = f"{self.ckpt_path} (update {last_saved})" if last_saved is not None else "none saved yet"
                raise NonFiniteLoss(f"update {u}: {e}; training stopped. Last good checkpoint: {where}") from None
            self.history.append(m)
            if main:
                with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(success=f"{m['success']:.2f}", pg=f"{m['pg_loss']:.3f}")
                if (u + 1) % cfg.log_every == 0 or u + 1 == end:
                    if cfg.progress:
                        bar.write(self.format_line(m))
                    else:
                        print(self.format_line(m), flush=True)
            if (u + 1) % cfg.save_every == 0 or u + 1 == end:
                self.save(u + 1)
                last_saved = u + 1
        bar.close()
        if main and self.history:
            from .plot import learning_curve

            learning_curve(self.history, os.path.join(cfg.out_dir, "learning_curve.png"),
                           f"{cfg.env} / {cfg.estimator}")
        if self.history and end == cfg.updates:
            self.save_final()
        return self.history

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl holds exactly the history so far (a resumed run drops later lines)."""
        with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "w") as f:
            for m in self.history:
                f.write(json.dumps(m) + "\n")

    @staticmethod
    def format_line(m: Dict[str, float]) -> str:
        return (f"update {m['update']:4d}  success {m['success']:.3f}  return {m['return']:.3f}  "
                f"steps {m['steps_per_episode']:.2f}  pg_loss {m['pg_loss']:+.4f}  vf_loss {m['vf_loss']:.4f}  "
                f"clipfrac {m['pg_clipfrac']:.3f}  kl {m['ppo_kl']:+.4f}  entropy {m['entropy']:.3f}  "
                f"rollout {m['rollout_s']:.2f}s  update {m['update_s']:.2f}s")


def backends_used(trainer: "Trainer") -> Dict[str, str]:
    """The kernel backend each op of the trainer runs on, on the trainer's device."""
    dev, b = trainer.device, trainer.cfg.backend
    est = trainer.cfg.estimator
    whiten = ["whiten_moments", "whiten_apply"]
    credit = {"step_gae": ["step_gae", *whiten], "token_gae": ["token_gae", *whiten],
              "reinforce_pp": ["token_gae", *whiten], "grpo": ["step_rewards", "group_advantage"],
              "rloo": ["step_rewards", "group_advantage"],
              "gigpo": ["step_rewards", "group_advantage", "step_gae"]}[est]
    ops = ["linear_token_logprobs", "linear_policy_loss", *credit, "broadcast_to_tokens"]
    out = {op: resolve_backend(op, dev, b) for op in ops}
    if trainer.cfg.needs_critic:
        out["value_loss"] = resolve_backend("value_loss", dev, trainer.vf_backend)
    return out


def run(config: TrainConfig, resume: bool = False, stop_after: Optional[int] = None,
        overwrite: bool = False) -> List[Dict[str, float]]:
    """Train under ``config``; under ``torchrun`` (WORLD_SIZE > 1) first join the process group
    (nccl on GPUs, gloo on the CPU) and leave it at the end. The run folder is checked before
    the model is built (see :meth:`Trainer.train` for ``resume`` and ``overwrite``)."""
    checks.check_run_folder(config.out_dir, resume, overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined = False
    if world > 1 and not dist.is_initialized():
        gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if gpu else "gloo")
        joined = True
    trainer, finished = None, False
    try:
        trainer = Trainer(config)
        history = trainer.train(resume=resume, stop_after=stop_after, overwrite=overwrite)
        finished = True
        return history
    finally:
        if joined:
            # Leave together: rank 0 still saves the final model when the others are done, and a
            # rank that tears its process group down under a live DDP wrapper while a peer still
            # holds connections can abort at exit. Release DDP first, then wait for every rank
            # (only after a clean finish: a rank that failed would leave the others waiting).
            if trainer is not None:
                trainer.ddp = None
            del trainer
            if finished:
                dist.barrier()
            dist.destroy_process_group()
