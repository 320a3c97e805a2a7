"""What the trainer checks so that a run is never silently wrong.

* Run folders: a new run does not replace the files of an earlier one unless asked to
  (``overwrite``); an ``out_dir`` that cannot hold a run is refused before training.
* Checkpoints: an unreadable file, one of another model or task, or one whose tensors are
  not finite or differ from the CRC-32 checksums saved with them is refused, naming the
  file and the setting or tensor.
* Resumed settings: the ones that make a run what it is (``RUN_IDENTITY``) must match the
  checkpoint's; the others may change, and each change is named.
* Environments: what ``reset`` and ``step`` return is checked, naming the environment,
  the episode and the step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import zlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TINY_MODEL, TrainConfig

# What a run writes into its folder.
RUN_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.jsonl", "learning_curve.png", "final")
# Settings a checkpoint resumes only under: they fix the model's shape, the task or the method.
RUN_IDENTITY = ("env", "env_kwargs", "estimator", "model", "model_config", "critic")
# Settings of one invocation, not of the run: never reported as changes on resume.
INVOCATION = ("out_dir", "progress")
CHECKPOINT_KEYS = ("update", "config", "model", "optim", "rng", "history")


# ---------------------------------------------------------------------- run folders
def run_files(out_dir: str) -> List[str]:
    """The files of a run present in ``out_dir``."""
    return [f for f in RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]


def check_run_folder(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Raises ValueError if a run cannot start in ``out_dir``: it is a file, it cannot be created
    or written, or it holds a run that is neither resumed nor to be overwritten. Changes nothing."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in the folder, "
                         "overwrite replaces it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir} is a file, not a folder")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"out_dir {out_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {out_dir} is not writable ({existing})")
    found = [] if (resume or overwrite) else run_files(out_dir)
    if found:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                         f"replace it with --overwrite, or choose another folder with --out "
                         f"(in Python: train(resume=True), train(overwrite=True) or another out_dir)")


def prepare_run_folder(out_dir: str, overwrite: bool) -> List[str]:
    """Creates ``out_dir``; with ``overwrite`` removes an earlier run's files first (returned)."""
    removed = run_files(out_dir) if overwrite else []
    try:
        for f in removed:
            p = os.path.join(out_dir, f)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot prepare the run folder {out_dir}: {e}") from None
    return removed


# ---------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str, mmap: bool = False) -> Dict[str, Any]:
    """The trainer checkpoint at ``path``, on the CPU; a ValueError naming the file when it is
    missing, empty, damaged or not a trainer checkpoint. ``mmap``: leave the tensors on disk
    (enough to read the settings)."""
    if not os.path.exists(path):
        tmp = path + ".tmp"
        hint = (f" ({os.path.basename(tmp)} there is a save that was interrupted before it finished)"
                if os.path.exists(tmp) else "")
        raise ValueError(f"no checkpoint to resume from at {path!r}{hint}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the checkpoint is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # torch's zip reader, pickle and decoding errors all mean the same here
        reason = " ".join(str(e).split()).split(". ")[0][:200]
        raise ValueError(f"{path}: cannot read the checkpoint, the file is damaged, truncated or not a "
                         f"checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a trainer checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a complete trainer checkpoint (no {', '.join(missing)})")
    bad = [k for k in ("config", "model", "optim") if not isinstance(state[k], Mapping)]
    if bad:
        raise ValueError(f"{path}: not a trainer checkpoint ({', '.join(bad)} is not a mapping)")
    return state


def saved_settings(path: str) -> Dict[str, Any]:
    """The settings a checkpoint was saved with (its ``config``), only the keys this version knows;
    a ValueError names the file and the keys it does not know."""
    saved = read_checkpoint(path, mmap=True)["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{path}: saved with setting(s) this version does not know: {', '.join(unknown)}")
    return saved


def _show(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)


def _differing(old: Mapping, new: Mapping) -> Tuple[Dict, Dict]:
    keys = [k for k in {**old, **new} if old.get(k, "<unset>") != new.get(k, "<unset>")]
    return {k: old.get(k) for k in keys if k in old}, {k: new.get(k) for k in keys if k in new}


def resume_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> Tuple[List[str], List[str]]:
    """(conflicts, changes) between the settings saved in a checkpoint and ``cfg``: settings of
    ``RUN_IDENTITY`` that differ, and the others that differ, each as one readable phrase."""
    conflicts, changes = [], []
    for f in dataclasses.fields(TrainConfig):
        k = f.name
        if k in INVOCATION:
            continue
        new = getattr(cfg, k)
        if k in saved:
            old = saved[k]
        elif f.default is not dataclasses.MISSING:
            old = f.default
        else:
            old = f.default_factory()  # type: ignore[misc]
        if k == "critic" and not cfg.needs_critic:
            continue  # no critic either way, or the estimator's difference says it
        if k == "model_config" and cfg.model is None and saved.get("model") is None:
            old, new = {**TINY_MODEL, **(old or {})}, {**TINY_MODEL, **new}
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            old, new = _differing(old, new)
        if k in RUN_IDENTITY:
            conflicts.append(f"{k}: {_show(old)} in the checkpoint, {_show(new)} now")
        else:
            changes.append(f"{k} {_show(old)} -> {_show(new)}")
    return conflicts, changes


def _tensors(state: Mapping[str, Any], param_names: Sequence[str]) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """(checksum key, readable name, tensor) of every tensor of the model and optimiser state."""
    for name, t in state["model"].items():
        if isinstance(t, torch.Tensor):
            yield f"model/{name}", f"weight {name}", t
    for idx, st in state["optim"].get("state", {}).items():
        pname = param_names[idx] if isinstance(idx, int) and 0 <= idx < len(param_names) else f"#{idx}"
        for key, t in st.items():
            if isinstance(t, torch.Tensor):
                yield f"optim/{idx}/{key}", f"optimiser state {key} of {pname}", t


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def checksums(state: Mapping[str, Any]) -> Dict[str, int]:
    """CRC-32 of the bytes of every model and optimiser tensor of a checkpoint's state."""
    return {key: _crc(t) for key, _, t in _tensors(state, ())}


def check_restored(state: Mapping[str, Any], path: str, param_names: Sequence[str]) -> None:
    """Every restored tensor is finite and, where the checkpoint has checksums, has the bytes it
    was saved with; otherwise a ValueError naming ``path`` and the tensor."""
    saved = state.get("checksums")
    for key, name, t in _tensors(state, param_names):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{path}: {name} is not finite ({bad} of {t.numel()} values are NaN or infinite); "
                             f"the checkpoint cannot be resumed")
        if saved is not None and saved.get(key) != _crc(t):
            raise ValueError(f"{path}: {name} differs from the checksum saved with it: the file was changed "
                             f"or damaged after it was written")


# ---------------------------------------------------------------------- environments
class CheckedEnv:
    """An environment whose results are checked: ``reset`` must return a str observation,
    ``step`` an (observation, reward, done) triple with a finite number as reward, a bool as done
    and a str observation while the episode goes on. Every other attribute is the environment's."""

    def __init__(self, env: Any, name: str):
        self._env, self._name, self._seed, self._t = env, name, None, 0

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._env, attr)

    @property
    def unwrapped(self) -> Any:
        """The environment itself, unchecked (as gym's ``unwrapped``)."""
        return self._env

    def _where(self) -> str:
        return f"environment {self._name!r}, episode seed {self._seed}, step {self._t}"

    def reset(self, seed: Optional[int] = None) -> str:
        self._seed, self._t = seed, 0
        obs = self._env.reset(seed)
        if not isinstance(obs, str):
            raise ValueError(f"environment {self._name!r}, episode seed {seed}: reset() returned observation "
                             f"{obs!r}; an observation must be a str")
        return obs

    def step(self, action: str):
        from .envs import StepResult

        self._t += 1
        out = self._env.step(action)
        if not isinstance(out, tuple) or len(out) != 3:
            raise ValueError(f"{self._where()}: step() returned {out!r}; expected (observation, reward, done)")
        obs, reward, done = out
        try:
            r = float(reward) if not isinstance(reward, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            r = math.nan
        if not math.isfinite(r):
            raise ValueError(f"{self._where()}: step() returned reward {reward!r}; a reward must be a finite number")
        if not (isinstance(done, (bool, np.bool_)) or (isinstance(done, int) and done in (0, 1))):
            raise ValueError(f"{self._where()}: step() returned done {done!r}; done must be True or False")
        if not done and not isinstance(obs, str):
            raise ValueError(f"{self._where()}: step() returned observation {obs!r}; an observation must be a str")
        return StepResult(obs, r, bool(done))


def env_factory(name: str, kwargs: Mapping[str, Any]) -> Callable[[], CheckedEnv]:
    """A factory of checked environments ``name(**kwargs)``; a constructor that rejects the
    kwargs, or an object without ``reset``, ``step`` and ``max_steps``, is a ValueError."""
    from . import envs

    def make() -> CheckedEnv:
        try:
            env = envs.make_env(name, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"environment {name!r} cannot be made with env_kwargs {dict(kwargs)}: {e}") from e
        missing = [a for a in ("reset", "step", "max_steps") if not hasattr(env, a)]
        if missing:
            raise ValueError(f"environment {name!r} has no {', '.join(missing)} (see envs.Environment)")
        return CheckedEnv(env, name)

    return make
