"""The verl adapter on the layouts verl produces: the same episodes as the StepPO authors' step rows,
as verl's agent-loop rows (one row per trajectory, turns separated by tool tokens) and as verl V1's
per-turn outputs (keyed ``{uid}_{session}_{i}``, final score copied onto every output) give the same
per-turn advantages, losses and gradients. Batches are built field by field as verl builds them
(``AgentLoopWorker._postprocess``, ``AgentLoopOutput.as_dict``, ``AgentLoopWorkerTQ``), and the
losses run through verl's own ``ppo_loss`` and policy-loss registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

from verl import DataProto  # noqa: E402

from steppo_fast import StepLayout, compute_advantages  # noqa: E402
from steppo_fast.integrations import verl as sv  # noqa: E402
from steppo_fast.testing import assert_close  # noqa: E402

PROMPT = 3  # prompt width (left padded)


# ------------------------------------------------------------------ episodes
@dataclass
class Traj:
    uid: str
    session: int
    turn_len: List[int]
    obs_len: List[int]  # tool tokens after each turn; len K - 1, or K when the episode ends on a tool reply
    outcome: float  # the final score (verl's reward_score)
    turn_reward: List[float]  # extra reward for turn k (on the tool tokens right after it; 0 for the last)
    token_reward: List[np.ndarray]  # per agent token rewards (a KL-like penalty), per turn
    old: List[np.ndarray]
    new: List[np.ndarray]
    value: List[np.ndarray]
    prompt_len: int = PROMPT

    @property
    def K(self) -> int:
        return len(self.turn_len)


def make_trajs(seed: int, n_groups: int = 3, group_size: int = 3, max_turns: int = 4, max_len: int = 4,
               intermediate: bool = True, token_rewards: bool = True, end_on_tool: bool = True) -> List[Traj]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        for s in range(group_size):
            K = int(rng.integers(1, max_turns + 1))
            tl = [int(x) for x in rng.integers(1, max_len + 1, K)]
            n_obs = K - 1 + int(end_on_tool and rng.random() < 0.5)
            ol = [int(x) for x in rng.integers(1, 4, n_obs)]
            tr = [float(rng.standard_normal()) if (intermediate and k < K - 1) else 0.0 for k in range(K)]
            tok = [(0.1 * rng.standard_normal(n) if token_rewards else np.zeros(n)) for n in tl]
            old = [-1.5 + 0.5 * rng.standard_normal(n) for n in tl]
            new = [o + 0.3 * rng.standard_normal(len(o)) for o in old]
            val = [rng.standard_normal(n) for n in tl]
            out.append(Traj(f"task-{g}", s, tl, ol, float(rng.integers(0, 2)) + 0.25 * g, tr, tok, old, new, val,
                            prompt_len=PROMPT - int(rng.integers(0, 2))))
    return out


@dataclass
class Batch:
    data: DataProto
    new_log_prob: torch.Tensor  # (B, T) float32, the current policy's log-probs
    where: Dict[Tuple[int, int], Tuple[int, np.ndarray]] = field(default_factory=dict)  # (traj, turn) -> (row, cols)
    keys: List[str] = None


def _pad_rows(rows: List[np.ndarray], width: int, value=0.0, dtype=np.float32) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _finish(responses, resp_mask, scores, rewards, values, old, new, prompt_lens, extra, where, keys=None) -> Batch:
    """Tensors as verl holds them after its post-processing: int64 ids and masks, float32 the rest."""
    T = max(len(r) for r in responses)
    B = len(responses)
    resp_ids = torch.as_tensor(_pad_rows(responses, T, 0, np.int64))
    valid = torch.as_tensor(_pad_rows([np.ones(len(r)) for r in responses], T, 0, np.int64))
    prompts = torch.zeros(B, PROMPT, dtype=torch.int64)
    pmask = torch.zeros(B, PROMPT, dtype=torch.int64)
    for i, p in enumerate(prompt_lens):
        prompts[i, PROMPT - p:] = 7
        pmask[i, PROMPT - p:] = 1
    batch = {
        "prompts": prompts,
        "responses": resp_ids,
        "response_mask": torch.as_tensor(_pad_rows(resp_mask, T, 0, np.int64)) * valid,
        "input_ids": torch.cat([prompts, resp_ids], 1),
        "attention_mask": torch.cat([pmask, valid], 1),
        "rm_scores": torch.as_tensor(_pad_rows(scores, T)),
        "token_level_scores": torch.as_tensor(_pad_rows(scores, T)),
        "token_level_rewards": torch.as_tensor(_pad_rows(rewards, T)),
        "values": torch.as_tensor(_pad_rows(values, T)),
        "old_log_probs": torch.as_tensor(_pad_rows(old, T)),
    }
    new_lp = torch.as_tensor(_pad_rows(new, T))
    return Batch(DataProto.from_dict(tensors=batch, non_tensors=extra), new_lp, where, keys)


def agent_loop_rows(trajs: List[Traj]) -> Batch:
    """One row per trajectory, as ``AgentLoopWorker._postprocess`` emits it: response = turn 1, tool
    tokens, turn 2, ...; mask 1 on generated tokens; the score on the last valid response token."""
    rng = np.random.default_rng(1)
    cols = dict(responses=[], mask=[], scores=[], rewards=[], values=[], old=[], new=[])
    where, num_turns, turn_scores = {}, [], []
    for r, tr in enumerate(trajs):
        resp, m, rew, val, old, new = [], [], [], [], [], []
        for k in range(tr.K):
            start = len(resp)
            n = tr.turn_len[k]
            resp += list(rng.integers(10, 50, n))
            m += [1] * n
            rew += list(tr.token_reward[k])
            val += list(tr.value[k])
            old += list(tr.old[k])
            new += list(tr.new[k])
            where[(r, k)] = (r, np.arange(start, start + n))
            if k < len(tr.obs_len):
                o = tr.obs_len[k]
                resp += list(rng.integers(50, 90, o))
                m += [0] * o
                rew += [tr.turn_reward[k]] + [0.0] * (o - 1)  # a turn's reward on the tool reply after it
                val += list(rng.standard_normal(o))  # the critic's outputs there are never read
                old += list(rng.standard_normal(o))
                new += list(rng.standard_normal(o))
        score = np.zeros(len(resp))
        score[-1] = tr.outcome
        rew = np.asarray(rew) + score
        for name, v in (("responses", resp), ("mask", m), ("scores", score), ("rewards", rew), ("values", val),
                        ("old", old), ("new", new)):
            cols[name].append(np.asarray(v))
        num_turns.append(tr.K + len(tr.obs_len) + 1)  # user + assistant + tool turns, as ToolAgentLoop counts
        turn_scores.append([tr.turn_reward[k] for k in range(tr.K)])
    extra = {
        "uid": np.array([t.uid for t in trajs], dtype=object),
        "__num_turns__": np.array(num_turns, dtype=np.int32),
        "turn_scores": _objects(turn_scores),
        "tool_rewards": _objects([[] for _ in trajs]),
    }
    return _finish(cols["responses"], cols["mask"], cols["scores"], cols["rewards"], cols["values"], cols["old"],
                   cols["new"], [t.prompt_len for t in trajs], extra, where)


def _objects(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = [None] * len(items)
    for i, v in enumerate(items):
        out[i] = v
    return out


def _one_turn_rows(trajs: List[Traj], order, reward_of, extra_of):
    rng = np.random.default_rng(2)
    cols = dict(responses=[], mask=[], scores=[], rewards=[], values=[], old=[], new=[])
    where, extra_cols = {}, {}
    for row, (r, k) in enumerate(order):
        tr = trajs[r]
        n = tr.turn_len[k]
        score, rew = reward_of(tr, k, n)
        cols["responses"].append(rng.integers(10, 50, n))
        cols["mask"].append(np.ones(n))
        cols["scores"].append(score)
        cols["rewards"].append(rew)
        cols["values"].append(tr.value[k])
        cols["old"].append(tr.old[k])
        cols["new"].append(tr.new[k])
        where[(r, k)] = (row, np.arange(n))
        for key, v in extra_of(tr, r, k).items():
            extra_cols.setdefault(key, []).append(v)
    return cols, where, extra_cols


def step_rows(trajs: List[Traj], seed: int = 0, pad_copies: int = 0) -> Batch:
    """The StepPO authors' layout: one row per step (the turn's tokens), rows shuffled, a step's reward
    on its last agent token, ``trajectory_uids`` / ``step_indices``; ``pad_copies`` real rows appended
    again with ``is_pad`` (their world-size padding)."""
    order = [(r, k) for r, t in enumerate(trajs) for k in range(t.K)]
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    order += order[:pad_copies]

    def reward_of(tr, k, n):
        score = np.zeros(n)
        if k == tr.K - 1:
            score[-1] = tr.outcome
        rew = tr.token_reward[k].copy()
        rew[-1] += tr.turn_reward[k]
        return score, rew + score

    cols, where, ex = _one_turn_rows(trajs, order, reward_of, lambda tr, r, k: {
        "uid": tr.uid, "trajectory_uids": f"{tr.uid}/{tr.session}", "step_indices": k})
    extra = {"uid": np.array(ex["uid"], dtype=object), "trajectory_uids": np.array(ex["trajectory_uids"], dtype=object),
             "step_indices": np.array(ex["step_indices"], dtype=np.int64)}
    if pad_copies:
        extra["is_pad"] = np.array([i >= len(order) - pad_copies for i in range(len(order))])
        where = {key: v for key, v in where.items()}
    return _finish(cols["responses"], cols["mask"], cols["scores"], cols["rewards"], cols["values"], cols["old"],
                   cols["new"], [trajs[r].prompt_len for r, _ in order], extra, where)


def per_turn_outputs(trajs: List[Traj], seed: int = 0) -> Batch:
    """verl V1's agent loop returning one output per turn: keys ``{uid}_{session}_{i}``, the final score
    copied onto every output's last response token (``AgentLoopWorkerTQ._agent_loop_postprocess``),
    rows in any order, right padded by ``to_padded_tensor``."""
    order = [(r, k) for r, t in enumerate(trajs) for k in range(t.K)]
    order = [order[i] for i in np.random.default_rng(seed + 1).permutation(len(order))]

    def reward_of(tr, k, n):
        score = np.zeros(n)
        score[-1] = tr.outcome  # copied onto every output
        return score, tr.token_reward[k] + score

    cols, where, ex = _one_turn_rows(trajs, order, reward_of, lambda tr, r, k: {"uid": tr.uid})
    keys = [f"{trajs[r].uid}_{trajs[r].session}_{k}" for r, k in order]
    extra = {"uid": np.array(ex["uid"], dtype=object)}
    return _finish(cols["responses"], cols["mask"], cols["scores"], cols["rewards"], cols["values"], cols["old"],
                   cols["new"], [trajs[r].prompt_len for r, _ in order], extra, where, keys)


def per_turn(b: Batch, t: torch.Tensor, trajs) -> List[torch.Tensor]:
    """The values of a (B, T) tensor on each turn's tokens, in (trajectory, turn) order."""
    return [t[b.where[(r, k)][0], torch.as_tensor(b.where[(r, k)][1])] for r, tr in enumerate(trajs)
            for k in range(tr.K)]


def assert_same_per_turn(a: Batch, ta, b: Batch, tb, trajs, msg=""):
    for i, (x, y) in enumerate(zip(per_turn(a, ta, trajs), per_turn(b, tb, trajs))):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=lambda m: f"{msg} turn {i}: {m}")


def _adv(b: Batch, name, reward_source="token_level_rewards", **kw):
    data = sv.compute_advantage(b.data, name, batch_keys=b.keys, reward_source=reward_source, **kw)
    return data.batch["advantages"], data.batch["returns"]


def _config(global_batch_info=None, **kw):
    cfg = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                                  clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)
    if global_batch_info:
        cfg.global_batch_info.update(global_batch_info)
    return cfg


def hand_step_gae(trajs: List[Traj], gamma: float, lam: float):
    """StepPO's step GAE computed by hand in float64 from the episodes (SPEC 4): whitened advantages
    and returns, one per turn in (trajectory, turn) order."""
    A, R = [], []
    for tr in trajs:
        r = [float(np.float32(tr.token_reward[k]).astype(np.float64).sum()) + tr.turn_reward[k]
             + (tr.outcome if k == tr.K - 1 else 0.0) for k in range(tr.K)]
        v = [float(np.float32(tr.value[k][0])) for k in range(tr.K)]
        adv, last = [0.0] * tr.K, 0.0
        for k in reversed(range(tr.K)):
            delta = r[k] + gamma * (v[k + 1] if k + 1 < tr.K else 0.0) - v[k]
            last = delta + gamma * lam * last
            adv[k] = last
        A += adv
        R += [a + x for a, x in zip(adv, v)]
    A = np.asarray(A)
    return (A - A.mean()) / (A.std(ddof=1) + 1e-8), np.asarray(R)


# ------------------------------------------------------------------ advantages
STEP_ESTIMATORS = ["step_gae", "token_gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]


@pytest.mark.parametrize("estimator", STEP_ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_agent_loop_rows_equal_step_rows(estimator, seed):
    # Intermediate rewards on the tool tokens after a turn, per-token rewards, episodes that end on a
    # tool reply (verl's score then sits on a tool token): all must land on the same turns.
    trajs = make_trajs(seed)
    a, b = step_rows(trajs, seed), agent_loop_rows(trajs)
    adv_a, ret_a = _adv(a, estimator, gamma=0.9, lam=0.8)
    adv_b, ret_b = _adv(b, estimator, gamma=0.9, lam=0.8)
    assert_same_per_turn(a, adv_a, b, adv_b, trajs, f"{estimator} advantages")
    assert_same_per_turn(a, ret_a, b, ret_b, trajs, f"{estimator} returns")
    for batch, adv in ((a, adv_a), (b, adv_b)):  # nothing off the agent tokens
        assert not bool(adv[batch.data.batch["response_mask"] == 0].any())


@pytest.mark.parametrize("estimator", ["step_gae", "token_gae", "gae", "grpo", "rloo", "reinforce_plus_plus"])
def test_per_turn_outputs_equal_step_rows(estimator):
    # verl V1 copies the final score onto every output; counted once it gives the step rows' numbers.
    trajs = make_trajs(3, intermediate=False)
    a, c = step_rows(trajs, 3), per_turn_outputs(trajs, 3)
    adv_a, ret_a = _adv(a, "token_gae" if estimator == "gae" else estimator, gamma=0.95, lam=0.9)
    adv_c, ret_c = _adv(c, estimator, gamma=0.95, lam=0.9)
    assert_same_per_turn(a, adv_a, c, adv_c, trajs, estimator)
    assert_same_per_turn(a, ret_a, c, ret_c, trajs, estimator)


def test_step_gae_equals_hand_computation():
    trajs = make_trajs(5)
    want_a, want_r = hand_step_gae(trajs, 0.9, 0.8)
    for b in (step_rows(trajs, 5), agent_loop_rows(trajs)):
        adv, ret = _adv(b, "step_gae", gamma=0.9, lam=0.8)
        got_a = torch.stack([t.unique() for t in per_turn(b, adv, trajs)]).squeeze(1)  # constant within a turn
        got_r = torch.stack([t.unique() for t in per_turn(b, ret, trajs)]).squeeze(1)
        assert_close(got_a, torch.as_tensor(want_a), torch.float32)
        assert_close(got_r, torch.as_tensor(want_r), torch.float32)


def test_gae_on_agent_loop_rows_equals_verls_gae():
    # verl's own token-level GAE on its multi-turn rows (it skips tool tokens) is our 'gae' there.
    trajs = make_trajs(6, intermediate=False, end_on_tool=False)
    b = agent_loop_rows(trajs)
    d = b.data.batch
    want_a, want_r = core_algos.compute_gae_advantage_return(d["token_level_rewards"], d["values"],
                                                             d["response_mask"], gamma=0.9, lam=0.7)
    adv, ret = _adv(b, "gae", gamma=0.9, lam=0.7)
    m = d["response_mask"].bool()
    torch.testing.assert_close(adv[m], want_a[m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret[m], want_r[m], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_outcome_estimators_equal_verls_on_agent_loop_rows(estimator):
    trajs = make_trajs(7)
    b = agent_loop_rows(trajs)
    d, uid = b.data.batch, b.data.non_tensor_batch["uid"]
    fn = {"grpo": core_algos.compute_grpo_outcome_advantage, "rloo": core_algos.compute_rloo_outcome_advantage}
    want, _ = fn[estimator](d["token_level_rewards"], d["response_mask"], uid)
    adv, _ = _adv(b, estimator)
    m = d["response_mask"].bool()
    torch.testing.assert_close(adv[m], want[m], rtol=1e-5, atol=1e-6)


def test_copied_reward_counts_once_on_the_last_output():
    # One session of three turns, final score 1, no critic values, gamma = lambda = 1: the step returns
    # are 1, 1, 1; summing verl's copies would give 3, 2, 1.
    tr = Traj("task-0", 0, [2, 1, 3], [1, 1], 1.0, [0.0] * 3, [np.zeros(n) for n in (2, 1, 3)],
              [np.zeros(n) for n in (2, 1, 3)], [np.zeros(n) for n in (2, 1, 3)], [np.zeros(n) for n in (2, 1, 3)])
    c = per_turn_outputs([tr])
    for mode, want in (("last", [1.0, 1.0, 1.0]), ("each", [3.0, 2.0, 1.0])):
        _, ret = _adv(c, "step_gae", copied_reward=mode)
        got = [float(t[0]) for t in per_turn(c, ret, [tr])]
        assert got == want, (mode, got)


def test_copied_reward_keeps_the_kl_penalty_of_earlier_outputs():
    # With use_kl_in_reward, token_level_rewards = scores - beta * kl on every output: only the copied
    # score is dropped from the earlier outputs, the penalty stays (token_reward plays the penalty here).
    trajs = make_trajs(8, intermediate=False)
    a, c = step_rows(trajs), per_turn_outputs(trajs)
    assert any(float(np.abs(t).sum()) > 0 for tr in trajs for t in tr.token_reward)
    assert_same_per_turn(a, _adv(a, "token_gae")[0], c, _adv(c, "token_gae")[0], trajs)


def test_turn_scores_as_the_reward_source():
    trajs = make_trajs(9)
    b = agent_loop_rows(trajs)
    want = _adv(b, "step_gae", gamma=0.9)[0]
    # The same batch with the turn rewards taken out of token_level_rewards and read from turn_scores.
    b2 = agent_loop_rows(trajs)
    r = b2.data.batch["token_level_rewards"]
    for i, tr in enumerate(trajs):
        for k in range(min(tr.K, len(tr.obs_len))):
            r[i, int(b2.where[(i, k)][1][-1]) + 1] -= np.float32(tr.turn_reward[k])
    got = _adv(b2, "step_gae", reward_source="both", gamma=0.9)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_adv(b2, "step_gae", gamma=0.9)[0], want)  # the scores did matter
    # turn_scores alone: the step rewards are the scores, nothing else.
    b3 = agent_loop_rows(trajs)
    only = _adv(b3, "grpo", reward_source="turn_scores")[0]
    for tr in trajs:
        tr.outcome, tr.token_reward = 0.0, [np.zeros(n) for n in tr.turn_len]
    b4 = agent_loop_rows(trajs)
    torch.testing.assert_close(only, _adv(b4, "grpo")[0], rtol=1e-6, atol=1e-6)


def test_is_pad_rows_take_no_part():
    trajs = make_trajs(10)
    clean, padded = step_rows(trajs, 1), step_rows(trajs, 1, pad_copies=3)
    want = _adv(clean, "step_gae", gamma=0.9)
    got = _adv(padded, "step_gae", gamma=0.9, num_repeat=3, norm_adv_by_std_in_grpo=True,
               gigpo_step_advantage_w=1.0, gigpo_mode="mean_std_norm", gigpo_enable_similarity=False,
               gigpo_similarity_thresh=0.95)  # the authors' trainer's call
    B = clean.data.batch["response_mask"].shape[0]
    for w, g in zip(want, got):
        torch.testing.assert_close(g[:B], w, rtol=0, atol=0)
        assert not bool(g[B:].any())


def test_gigpo_on_step_rows_and_per_turn_outputs():
    trajs = make_trajs(11, intermediate=False)
    a, c = step_rows(trajs, 2), per_turn_outputs(trajs, 2)
    rng = np.random.default_rng(0)
    anchors = {(r, k): f"state-{int(rng.integers(0, 3))}-{k}" for r, t in enumerate(trajs) for k in range(t.K)}
    for b in (a, c):
        rows = {row: key for key, (row, _) in b.where.items()}
        b.data.non_tensor_batch["anchor_obs"] = _objects([anchors[rows[i]] for i in range(len(rows))])
    kw = dict(gamma=0.9, gigpo_step_advantage_w=0.5, gigpo_mode="mean_std_norm")
    adv_a, adv_c = _adv(a, "gigpo", **kw)[0], _adv(c, "gigpo", **kw)[0]
    assert_same_per_turn(a, adv_a, c, adv_c, trajs)
    # Against steppo_fast's estimator on the layout built straight from the step rows.
    d, ex = a.data.batch, a.data.non_tensor_batch
    traj = torch.as_tensor(np.unique(ex["trajectory_uids"].astype(str), return_inverse=True)[1])
    lay = StepLayout.from_step_rows(d["response_mask"].bool(), traj, torch.as_tensor(ex["step_indices"]),
                                    torch.as_tensor(np.unique(ex["uid"].astype(str), return_inverse=True)[1]))
    keys = np.unique(ex["anchor_obs"].astype(str), return_inverse=True)[1]
    step_keys = torch.empty(lay.num_steps, dtype=torch.int64)
    step_keys[lay.row_step] = torch.as_tensor(keys)
    want = compute_advantages("gigpo", lay, token_rewards=d["token_level_rewards"].double(), anchor_keys=step_keys,
                              gamma=0.9, step_weight=0.5, gigpo_mode="mean_std_norm", backend="reference")
    assert_close(adv_a, want.token_advantages, torch.float32)


def test_step_gae_needs_values_and_says_how_to_get_them():
    b = agent_loop_rows(make_trajs(12))
    b.data.batch.pop("values")
    with pytest.raises(ValueError, match=r"critic\.enable=True"):
        _adv(b, "step_gae")


# ------------------------------------------------------------------ bad input
def _expect(b: Batch, match: str, estimator="step_gae", **kw):
    with pytest.raises(ValueError, match=match):
        _adv(b, estimator, **kw)


def test_bad_agent_loop_rows_name_the_uid():
    trajs = make_trajs(13)
    b = agent_loop_rows(trajs)
    b.data.batch["response_mask"][4] = 0
    _expect(b, r"row 4 \(uid 'task-1'\): response_mask has no agent token")
    b = agent_loop_rows(trajs)
    row = next(i for i, t in enumerate(trajs) if t.turn_len[0] >= 3)
    col = int(b.where[(row, 0)][1][1])
    b.data.batch["response_mask"][row, col] = 0  # a generated turn split in two
    _expect(b, rf"row {row} \(uid '{trajs[row].uid}'\): response_mask has {trajs[row].K + 1} runs of agent tokens "
               rf"but __num_turns__ = {b.data.non_tensor_batch['__num_turns__'][row]} allows at most {trajs[row].K}")
    _adv(b, "step_gae", check_num_turns=False)  # an agent loop that counts otherwise
    b = agent_loop_rows(trajs)
    row = next(i for i, t in enumerate(trajs) if t.turn_len[0] >= 2)
    b.data.batch["response_mask"][row, 0] = 0  # the row now starts with a template token ...
    b.data.batch["token_level_rewards"][row, 0] = 0.5  # ... that carries a reward
    _expect(b, rf"row {row} \(uid '{trajs[row].uid}'\): a reward of 0.5 sits at response position 0, before the "
               "row's first agent token")
    b = agent_loop_rows(trajs)
    b.data.non_tensor_batch["turn_scores"][2] = [1.0] * (trajs[2].K + 1)
    _expect(b, rf"row 2 \(uid 'task-0'\): turn_scores has {trajs[2].K + 1} entries but the row holds "
               rf"{trajs[2].K} turns", reward_source="turn_scores")


def test_bad_step_rows_name_the_trajectory():
    trajs = make_trajs(14)
    b = step_rows(trajs, 0, pad_copies=2)
    b.data.non_tensor_batch.pop("is_pad")  # the authors' padding copies, unmarked
    _expect(b, r"trajectory 'task-\d/\d': duplicate step index")
    b = step_rows(trajs)
    k = b.data.non_tensor_batch["step_indices"]
    i = int(np.flatnonzero(k == 0)[0])
    k[i] = 7
    _expect(b, r"trajectory 'task-\d/\d': gap in step indices")
    b = step_rows(trajs)
    tu = b.data.non_tensor_batch["trajectory_uids"]
    row = next(i for i in range(len(tu)) if (tu == tu[i]).sum() > 1)  # a trajectory of several steps
    b.data.non_tensor_batch["uid"][row] = "task-9"
    _expect(b, rf"trajectory '{tu[row]}': its rows carry different uid values")
    b = step_rows(trajs)
    b.data.non_tensor_batch.pop("step_indices")
    _expect(b, "non_tensor_batch has trajectory_uids but not step_indices")
    _expect(step_rows(trajs), r"'gae' is ambiguous on step rows.*'step_gae'", estimator="gae")
    _expect(step_rows(trajs), r"'opo' is verl's own.*step_rows layout", estimator="opo")


def test_bad_per_turn_outputs_name_the_key():
    trajs = make_trajs(15, intermediate=False)
    c = per_turn_outputs(trajs)
    r = next(i for i, t in enumerate(trajs) if t.K >= 2)
    row = c.where[(r, 1)][0]
    c.keys[row] = f"{trajs[r].uid}_{trajs[r].session}_5"
    _expect(c, rf"trajectory '{trajs[r].uid}_{trajs[r].session}': its rows are split inconsistently, an output "
               "index is missing")
    c = per_turn_outputs(trajs)
    c.keys[row] = f"{trajs[r].uid}_{trajs[r].session}_0"
    _expect(c, "an output index appears twice")
    c = per_turn_outputs(trajs)
    c.keys[0] = "task-0-session-1"
    _expect(c, r"batch key 'task-0-session-1' \(row 0\) is not of verl's form")
    c = per_turn_outputs(trajs)
    c.data.non_tensor_batch["uid"][0] = "task-other"
    _expect(c, r"names uid 'task-\d' but non_tensor_batch\['uid'\] holds 'task-other'")
    c = per_turn_outputs(trajs)
    c.keys = c.keys[:-1]
    _expect(c, "batch_keys must have one key per row")


def test_unknown_estimator_and_keywords():
    b = agent_loop_rows(make_trajs(16))
    _expect(b, "unknown advantage estimator 'gea'", estimator="gea")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['multi_turn'\]"):
        _adv(b, "grpo", multi_turn=True)
    _expect(b, "gigpo_enable_similarity=True", estimator="grpo", gigpo_enable_similarity=True)
    _expect(b, r"gigpo needs non_tensor_batch\['anchor_obs'\]", estimator="gigpo")
    b.data.non_tensor_batch["anchor_obs"] = _objects(["s"] * len(b.data))
    _expect(b, "gigpo needs one anchor state per turn", estimator="gigpo")
    _expect(b, "reward_source must be one of", reward_source="scores")


def test_verls_other_estimators_still_run_on_agent_loop_rows():
    pytest.importorskip("verl.trainer.ppo.ray_trainer")  # needs the test extra's cachetools, fastapi, uvicorn
    trajs = make_trajs(17)
    b = agent_loop_rows(trajs)
    d, uid = b.data.batch, b.data.non_tensor_batch["uid"]
    want, _ = core_algos.get_adv_estimator_fn("opo")(d["token_level_rewards"], d["response_mask"], index=uid)
    adv, _ = _adv(b, "opo")
    torch.testing.assert_close(adv, want)


def test_registered_step_gae_on_agent_loop_rows():
    trajs = make_trajs(18)
    b = agent_loop_rows(trajs)
    d, ex = b.data.batch, b.data.non_tensor_batch
    want, _ = _adv(agent_loop_rows(trajs), "step_gae", gamma=0.9, lam=0.8)
    fn = core_algos.get_adv_estimator_fn("step_gae")
    got, _ = fn(d["token_level_rewards"], d["response_mask"], index=ex["uid"], values=d["values"], gamma=0.9,
                lam=0.8)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="does not pass to a registered estimator"):
        fn(token_level_rewards=d["token_level_rewards"], response_mask=d["response_mask"], config=None,
           index=ex["uid"])


def test_count_turns():
    trajs = make_trajs(19)
    b, a = agent_loop_rows(trajs), step_rows(trajs, 0, pad_copies=2)
    n = sum(t.K for t in trajs)
    assert sv.count_turns(b.data) == n == sv.count_turns(a.data)  # is_pad rows left out
    assert sv.count_turns(b.data.batch["response_mask"]) == n
    assert sv.count_turns(a.data.batch["response_mask"]) == n + 2


# ------------------------------------------------------------------ losses
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _verl_info(b: Batch, agg: str, **over):
    """``global_batch_info`` as verl's ``ppo_loss`` fills it for one rank holding the whole batch."""
    mask = b.data.batch["response_mask"]
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": mask.shape[0],
            "loss_scale_factor": 64 if agg == "seq-mean-token-sum-norm" else None}
    info.update(over)
    return info


def _registry_loss(b: Batch, mode: str, agg: str, rows=None, info=None, **kw):
    d = b.data.batch
    rows = slice(None) if rows is None else rows
    cfg = _config(info if info is not None else _verl_info(b, agg))
    x = b.new_log_prob[rows].clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(mode)(
        old_log_prob=d["old_log_probs"][rows], log_prob=x, advantages=d["advantages"][rows],
        response_mask=d["response_mask"][rows].to(bool), loss_agg_mode=agg, config=cfg, rollout_is_weights=None, **kw)
    (grad,) = torch.autograd.grad(loss, [x])
    return loss.detach(), grad, metrics


def _three_layouts(seed=20):
    trajs = make_trajs(seed, intermediate=False)
    batches = {"step_rows": step_rows(trajs, seed), "agent_loop_rows": agent_loop_rows(trajs),
               "per_turn_outputs": per_turn_outputs(trajs, seed)}
    for b in batches.values():
        _adv(b, "step_gae", gamma=0.95, lam=0.9)
    return trajs, batches


@pytest.mark.parametrize("mode", ["steppo", "steppo_token"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_losses_and_gradients_equal_across_layouts(mode, agg):
    trajs, batches = _three_layouts()
    base = batches["step_rows"]
    want_loss, want_grad, want_m = _registry_loss(base, mode, agg)
    assert want_loss.dtype == torch.float32
    for name, b in batches.items():
        loss, grad, m = _registry_loss(b, mode, agg)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")
        assert_same_per_turn(base, want_grad, b, grad, trajs, f"{name} gradient")
        assert not bool(grad[b.data.batch["response_mask"] == 0].any())
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert m[key].dim() == 0
            torch.testing.assert_close(m[key], want_m[key], rtol=1e-6, atol=1e-6)


def _ppo_loss_through_verl(b: Batch, mode: str, agg: str):
    """verl's own actor loss (``verl.workers.utils.losses.ppo_loss``) on the batch, the model's log-probs
    given as verl's engines hand them over: one flat row of prompt + response tokens, shifted by one."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    d = b.data.batch
    att = d["attention_mask"]
    plen, rlen = att[:, :PROMPT].sum(1), att[:, PROMPT:].sum(1)
    x = b.new_log_prob.clone().requires_grad_(True)
    flat = torch.cat([torch.cat([torch.zeros(int(p) - 1), x[i, :int(r)], torch.zeros(1)])
                      for i, (p, r) in enumerate(zip(plen, rlen))])
    keys = ("prompts", "responses", "attention_mask", "response_mask", "old_log_probs", "advantages")
    td = TensorDict({k: d[k] for k in keys}, batch_size=[att.shape[0]])
    info = _verl_info(b, agg)
    tu.assign_non_tensor(td, dp_size=info["dp_size"], batch_num_tokens=info["batch_num_tokens"],
                         global_batch_size=info["global_batch_size"])
    cfg = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                                  clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg,
                                  loss_scale_factor=info["loss_scale_factor"],
                                  policy_loss=verl_config.PolicyLossConfig(loss_mode=mode))
    loss, _ = ppo_loss(cfg, {"log_probs": flat}, td)
    (grad,) = torch.autograd.grad(loss, [x])
    return loss.detach(), grad


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_verls_ppo_loss_sees_turns_in_every_layout(agg):
    trajs, batches = _three_layouts(21)
    base = batches["step_rows"]
    want_loss, want_grad = _ppo_loss_through_verl(base, "steppo", agg)
    torch.testing.assert_close(want_loss, _registry_loss(base, "steppo", agg)[0], rtol=1e-6, atol=1e-6)
    for name, b in batches.items():
        loss, grad = _ppo_loss_through_verl(b, "steppo", agg)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")
        assert_same_per_turn(base, want_grad, b, grad, trajs, name)


@pytest.mark.parametrize("ours,theirs", [("steppo_rows", "gspo"), ("steppo_token_rows", "vanilla")])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_rows_switch_is_verls_one_ratio_per_row(ours, theirs, agg):
    _, batches = _three_layouts(22)
    b = batches["agent_loop_rows"]
    a = _registry_loss(b, ours, agg)
    w = _registry_loss(b, theirs, agg)
    torch.testing.assert_close(a[0], w[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1], w[1], rtol=1e-6, atol=1e-6)
    # ... while the turn loss gives every turn its own ratio: a different loss on multi-turn rows.
    if ours == "steppo_rows":
        turns = _registry_loss(b, "steppo", agg)
        assert not torch.allclose(turns[1], w[1], rtol=1e-4, atol=1e-6)


def test_turn_count_under_data_parallelism():
    # Two ranks of two micro-batches each, as verl's engine runs them: each micro-batch's loss is
    # multiplied by dp_size and the gradients are averaged over ranks, so the step's loss is
    # (1 / dp) * sum of all micro-batch losses.
    trajs, batches = _three_layouts(23)
    b = batches["agent_loop_rows"]
    agg = "seq-mean-token-mean"
    B = b.data.batch["response_mask"].shape[0]
    parts = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, B)]
    info = dict(_verl_info(b, agg), dp_size=2)
    full = _registry_loss(b, "steppo", agg)[0]
    # With the mini-batch's global turn count (count_turns summed over the ranks): exactly the full batch.
    n = sum(sv.count_turns(b.data.batch["response_mask"][p]) for p in parts)
    exact = sum(_registry_loss(b, "steppo", agg, rows=p, info=info, global_num_turns=n)[0] for p in parts) / 2
    torch.testing.assert_close(exact, full, rtol=1e-6, atol=1e-6)
    # Without it: sum over micro-batches of (rows / global rows) x the micro-batch's mean over turns.
    default = sum(_registry_loss(b, "steppo", agg, rows=p, info=info)[0] for p in parts) / 2
    means = [_registry_loss(b, "steppo", agg, rows=p, info={})[0] for p in parts]
    rows = [p.stop - p.start for p in parts]
    torch.testing.assert_close(default, sum(r / B * m for r, m in zip(rows, means)), rtol=1e-6, atol=1e-6)
    # Equal turns per row in every micro-batch: the default is exact too.
    per_row = [sv.count_turns(b.data.batch["response_mask"][p]) / (p.stop - p.start) for p in parts]
    if len(set(per_row)) > 1:
        assert not torch.allclose(default, full, rtol=1e-6, atol=1e-6)
    sb = batches["step_rows"]  # one turn per row
    Bs = sb.data.batch["response_mask"].shape[0]
    halves = [slice(0, Bs // 2), slice(Bs // 2, Bs)]
    info = dict(_verl_info(sb, agg), dp_size=2)
    torch.testing.assert_close(sum(_registry_loss(sb, "steppo", agg, rows=p, info=info)[0] for p in halves) / 2,
                               _registry_loss(sb, "steppo", agg)[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the loss front's turn steps
_TRITON = "cpu" if __import__("os").environ.get("TRITON_INTERPRET") == "1" else None
KERNELS = ["cpp"] + (["triton"] if _TRITON else [])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_turn_steps_match_the_reference(backend, ratio_level, agg):
    from steppo_fast import policy_loss, reference as ref

    g = torch.Generator().manual_seed(3)
    B, T = 6, 13
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[2] = False  # a row without agent tokens
    mask[4] = True  # a row that is one turn
    old = -2 + 0.5 * torch.randn(B, T, generator=g)
    logp = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    w = 0.5 + torch.rand(B, T, generator=g)
    kw = dict(ratio_level=ratio_level, agg_mode=agg, weights=w, dual_clip=3.0 if ratio_level == "token" else None,
              clip_low=0.2, clip_high=0.28)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, mask_steps="turns", backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, [x])
    lay = StepLayout.from_turns(mask, validate=False)  # the empty row is legal for the loss
    x64 = logp.double().requires_grad_(True)
    loss64, m64 = ref.policy_loss(x64.reshape(-1), old.double().reshape(-1), adv.double().reshape(-1),
                                  lay.token_step, lay.num_steps, ratio_level, 0.2, 0.28, kw["dual_clip"], agg,
                                  w.double().reshape(-1), norm_constant=float(T))
    (grad64,) = torch.autograd.grad(loss64, [x64])
    assert_close(loss, loss64, torch.float32)
    assert_close(grad, grad64, torch.float32)
    for name in ("pg_clipfrac", "ppo_kl", "ratio_max"):
        assert_close(m[name], m64[name], torch.float32, name)
    # The layout built from the turns (host sync) and the device-only turn ids agree.
    x2 = logp.clone().requires_grad_(True)
    loss2, _ = policy_loss(x2, old, adv, lay, backend=backend, **kw)
    assert_close(loss2, loss64, torch.float32)
    if ratio_level == "step" and agg == "seq-mean-token-mean":  # and rows as steps is a different loss
        rows, _ = policy_loss(logp, old, adv, mask, backend=backend, **kw)
        assert not torch.allclose(rows, loss)
    with pytest.raises(ValueError, match="mask_steps must be one of"):
        policy_loss(logp, old, adv, mask, mask_steps="runs")
    with pytest.raises(ValueError, match=r"mask_steps='turns' needs a \(B, T\) mask"):
        policy_loss(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1), mask_steps="turns")


def test_authors_names_map_onto_ours():
    assert sv.AUTHORS_ESTIMATOR_NAMES["gae"] == "step_gae"  # their step GAE, not verl's token GAE
    assert sv.ESTIMATORS["gae"] == "token_gae" and sv.ESTIMATORS["step_gae"] == "step_gae"
    assert set(sv.AUTHORS_ESTIMATOR_NAMES.values()) <= set(sv.ESTIMATORS)
    trajs = make_trajs(24)
    a = step_rows(trajs)
    want = _adv(step_rows(trajs), "step_gae", gamma=0.9)[0]
    got = _adv(a, sv.AUTHORS_ESTIMATOR_NAMES["gae"], gamma=0.9)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
