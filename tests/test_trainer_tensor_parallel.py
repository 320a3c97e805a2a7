"""The trainer with its lm_head split over the vocabulary (``tensor_parallel``), on CPU processes
(gloo) under torchrun: against the single-process trainer, across ranks, through checkpoints
and resume, and the errors of a setting that cannot work."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from steppo_fast.trainer import parallel  # noqa: E402
from steppo_fast.trainer.config import TrainConfig  # noqa: E402
from steppo_fast.trainer.loop import Trainer  # noqa: E402

# One worker script for every multi-process case. argv: mode, tensor_parallel, out folder.
WORKER = r'''
import json, os, sys, warnings
import torch, torch.distributed as dist
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.loop import Trainer

torch.set_num_threads(1)
warnings.simplefilter("ignore")
mode, tp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank = dist.get_rank()

def cfg(folder, **kw):
    base = dict(env="lights", updates=3, groups=4, group_size=2, device="cpu", progress=False, eval_episodes=4,
                tensor_parallel=tp, save_every=1, out_dir=os.path.join(out, folder))
    base.update(kw)
    return TrainConfig(**base)

def record(t, hist):
    head = t.split_head
    return {"history": [{k: m[k] for k in ("pg_loss", "vf_loss", "success", "episodes", "grad_norm")} for m in hist],
            "params": {k: v.clone() for k, v in t.model.state_dict().items()},
            "head_rows": None if head is None else [head.start, head.size, head.vocab_size]}

res = {}
t = Trainer(cfg("full"))
res["eval_before"] = t.evaluate(16)  # the same held-out episodes as one process with the whole head
res["full"] = record(t, t.train())
if t.split_head is not None:  # writing a checkpoint gathers the Adam moments without touching them
    live = {k: v.clone() for k, v in t.optim.state[t.split_head.weight].items()}
    t.save(3)
    after = t.optim.state[t.split_head.weight]
    res["optim_untouched"] = all(torch.equal(v, after[k]) and v.shape == after[k].shape for k, v in live.items())
if mode == "resume":
    Trainer(cfg("part")).train(stop_after=2)
    if rank == 0:  # keep the checkpoint at update 2 for a resume in one process
        import shutil
        shutil.copytree(os.path.join(out, "part"), os.path.join(out, "part_at_2"))
    dist.barrier()
    t = Trainer(cfg("part"))
    res["resumed"] = record(t, t.train(resume=True))
    t = Trainer(cfg("vocab", full_vocab=True, env="hotpot", updates=2))
    res["vocab"] = record(t, t.train())
torch.save(res, os.path.join(out, f"rank{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
'''


def _torchrun(tmp_path, nproc, mode, tp):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{mode}_{nproc}_{tp}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), mode, str(tp), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Run outside the repository (see test_trainer.test_data_parallel_under_torchrun).
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "using the PyTorch reference" not in r.stderr
    return out, [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(nproc)]


def _single(tmp_path, name, **kw):
    base = dict(env="lights", updates=3, groups=4, group_size=2, device="cpu", progress=False, eval_episodes=4,
                save_every=1, out_dir=str(tmp_path / name))
    base.update(kw)
    t = Trainer(TrainConfig(**base))
    t.eval_before = t.evaluate(16)  # as the workers do
    return t, t.train()


def _close_models(a, b, tol=1e-4):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def _close_histories(a, b, tol=1e-4):
    assert len(a) == len(b)
    for ma, mb in zip(a, b):
        assert ma["episodes"] == mb["episodes"] and ma["success"] == mb["success"], (ma, mb)
        for k in ("pg_loss", "vf_loss", "grad_norm"):
            assert abs(ma[k] - mb[k]) <= tol * max(1.0, abs(mb[k])), (k, ma, mb)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tensor_parallel 2 on 2 processes: a run, a run stopped and resumed, a full-vocabulary run."""
    return _torchrun(tmp_path_factory.mktemp("tp2"), 2, "resume", 2)


def test_the_head_is_split_and_the_ranks_of_a_group_stay_identical(two_ranks):
    out, ranks = two_ranks
    V = ranks[0]["full"]["head_rows"][2]
    sizes = parallel.slice_sizes(V, 2)
    assert [r["full"]["head_rows"] for r in ranks] == [[0, sizes[0], V], [sizes[0], sizes[1], V]]
    for case in ("full", "resumed", "vocab"):
        a, b = (r[case]["params"] for r in ranks)
        head = [k for k in a if k.endswith("lm_head.weight")]
        assert len(head) == 1 and a[head[0]].shape[0] + b[head[0]].shape[0] == (
            ranks[0][case]["head_rows"][2])
        for k in a:  # everything but the head is replicated, bit for bit
            if k not in head:
                assert torch.equal(a[k], b[k]), (case, k)
        assert ranks[0][case]["history"] == ranks[1][case]["history"]


def test_split_head_trains_as_the_whole_head_does(two_ranks, tmp_path):
    """Same episodes and, to fp32 rounding of the sums' order, the same losses and parameters as
    one process with the whole head (a restricted head and the whole vocabulary)."""
    out, ranks = two_ranks
    assert ranks[0]["optim_untouched"] and ranks[1]["optim_untouched"]
    for case, kw in (("full", {}), ("vocab", dict(full_vocab=True, env="hotpot", updates=2))):
        t, hist = _single(tmp_path, case, **kw)
        if case == "full":
            assert ranks[0]["eval_before"] == ranks[1]["eval_before"] == t.eval_before
        _close_histories(ranks[0][case]["history"], hist)
        whole = torch.load(out / case / "checkpoint.pt", weights_only=False)["model"]
        ref = t.model.state_dict()
        _close_models(whole, ref)
        name = [k for k in ref if k.endswith("lm_head.weight")][0]
        # The checkpoint holds the whole head: the ranks' rows, in order.
        assert torch.equal(whole[name], torch.cat([r[case]["params"][name] for r in ranks]))


def test_resume_under_tensor_parallel_is_exact_and_the_checkpoint_resumes_anywhere(two_ranks, tmp_path):
    out, ranks = two_ranks
    for r in ranks:
        assert r["resumed"]["history"] == r["full"]["history"]
        for k, v in r["full"]["params"].items():
            assert torch.equal(r["resumed"]["params"][k], v), k
    # A checkpoint written by two tensor-parallel ranks resumes in one process (whole head).
    import shutil

    folder = tmp_path / "onward"
    shutil.copytree(out / "part_at_2", folder)
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert state["update"] == 2
    t = Trainer(TrainConfig(**{**state["config"], "out_dir": str(folder), "tensor_parallel": 1}))
    hist = t.train(resume=True)
    _close_histories(hist, ranks[0]["full"]["history"])


def test_the_final_model_holds_the_whole_head_and_loads(two_ranks):
    from transformers import AutoModelForCausalLM

    out, ranks = two_ranks
    model = AutoModelForCausalLM.from_pretrained(str(out / "full" / "final"))
    name = [k for k in ranks[0]["full"]["params"] if k.endswith("lm_head.weight")][0]
    whole = torch.cat([r["full"]["params"][name] for r in ranks])
    assert torch.equal(model.get_output_embeddings().weight.detach(), whole)
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(v, ranks[0]["full"]["params"]["policy." + k]), k


def test_a_rank_without_rows_of_the_restricted_head(tmp_path):
    """3 ranks on lights (V = 10: slices of 4, 3, 3 rows): the allowed tokens {1, 8, 9} leave the
    middle rank no rows of the restricted head; it still trains as one process does."""
    out, ranks = _torchrun(tmp_path, 3, "plain", 3)
    assert [r["full"]["head_rows"] for r in ranks] == [[0, 4, 10], [4, 3, 10], [7, 3, 10]]
    t = Trainer(TrainConfig(env="lights", updates=3, groups=4, group_size=2, device="cpu", progress=False,
                            eval_episodes=4, save_every=1, out_dir=str(tmp_path / "one")))
    assert t.allowed.tolist() == [1, 8, 9]
    assert all(r["eval_before"] == t.evaluate(16) for r in ranks)
    hist = t.train()
    _close_histories(ranks[0]["full"]["history"], hist)
    _close_models(torch.load(out / "full" / "checkpoint.pt", weights_only=False)["model"], t.model.state_dict())
    for r in ranks[1:]:
        assert r["full"]["history"] == ranks[0]["full"]["history"] and r["optim_untouched"]


def test_tensor_and_data_parallel_together(tmp_path):
    """4 processes: 2 data-parallel ranks of 2 tensor-parallel ranks each, against 2 plain
    data-parallel processes with the whole head (the same episodes)."""
    out4, ranks4 = _torchrun(tmp_path, 4, "plain", 2)
    out2, ranks2 = _torchrun(tmp_path, 2, "plain", 1)
    assert ranks4[0]["eval_before"] == ranks2[0]["eval_before"]
    _close_histories(ranks4[0]["full"]["history"], ranks2[0]["full"]["history"])
    # The checkpoint written under 2 x 2 holds the whole head and matches plain data parallel's.
    _close_models(torch.load(out4 / "full" / "checkpoint.pt", weights_only=False)["model"],
                  torch.load(out2 / "full" / "checkpoint.pt", weights_only=False)["model"])
    rows = [r["full"]["head_rows"] for r in ranks4]  # ranks 0, 1 and 2, 3 are the tensor-parallel groups
    assert rows[0] == rows[2] and rows[1] == rows[3] and rows[0][0] == 0 and rows[1][0] == rows[0][1]
    for r in ranks4[1:]:
        assert r["full"]["history"] == ranks4[0]["full"]["history"]
        for k, v in ranks4[0]["full"]["params"].items():
            if not k.endswith("lm_head.weight"):
                assert torch.equal(r["full"]["params"][k], v), k


# ---------------------------------------------------------------------- pieces and errors
def test_slices_follow_tensor_split():
    for rows, parts in [(16, 2), (17, 2), (7, 3), (5, 4), (3, 3)]:
        want = [len(c) for c in torch.arange(rows).tensor_split(parts)]
        assert parallel.slice_sizes(rows, parts) == want


def _tiny_policy(tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def test_split_head_keeps_its_rows_and_cuts_and_restores_state():
    policy = _tiny_policy()
    whole = policy.lm_head.weight.detach().clone()
    lay = parallel.ParallelLayout(world=3, rank=2, tp=3, tp_rank=2)
    head = parallel.split_lm_head(policy, lay)
    assert policy.get_output_embeddings() is head and (head.start, head.size, head.vocab_size) == (8, 3, 11)
    assert torch.equal(head.weight.detach(), whole[8:])
    state = {**policy.state_dict(), "lm_head.weight": whole}
    cut = parallel.local_state(policy, head, state)
    assert torch.equal(cut["lm_head.weight"], whole[8:]) and cut["model.norm.weight"] is state["model.norm.weight"]
    with pytest.raises(ValueError, match="lm_head.weight has 3 rows, the model's vocabulary has 11"):
        parallel.local_state(policy, head, policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters())
    policy.lm_head.weight.grad = torch.ones_like(head.weight)
    opt.step()
    i = [n for n, _ in policy.named_parameters()].index("lm_head.weight")
    full = opt.state_dict()
    full = {**full, "state": {**full["state"], i: {k: (torch.zeros(11, 8) if k != "step" else v)
                                                    for k, v in full["state"][i].items()}}}
    full["state"][i]["exp_avg"] = torch.arange(88.0).reshape(11, 8)
    mine = parallel.local_optim_state(opt, head, full)
    assert torch.equal(mine["state"][i]["exp_avg"], torch.arange(64.0, 88.0).reshape(3, 8))
    assert mine["state"][i]["exp_avg_sq"].shape == (3, 8) and mine["state"][i]["step"] is full["state"][i]["step"]


def test_tied_heads_and_groups_that_do_not_divide_are_refused(tmp_path):
    lay = parallel.ParallelLayout(world=2, rank=0, tp=2)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        parallel.split_lm_head(_tiny_policy(tie=True), lay)
    with pytest.raises(ValueError, match=r"tensor_parallel \(20\) exceeds the vocabulary \(11 rows\)"):
        parallel.split_lm_head(_tiny_policy(), parallel.ParallelLayout(world=20, rank=0, tp=20))
    with pytest.raises(ValueError, match=r"tensor_parallel \(2\) must divide the number of processes \(1\).*"
                                         r"--nproc_per_node=2"):
        Trainer(TrainConfig(env="lights", device="cpu", out_dir=str(tmp_path / "x"), tensor_parallel=2))
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1, got 0"):
        TrainConfig(tensor_parallel=0)


def test_cli_takes_the_flag(tmp_path, capsys):
    from steppo_fast import cli

    rc = cli.main(["train", "--env", "lights", "--tensor-parallel", "2", "--updates", "1", "--device", "cpu",
                   "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "tensor_parallel (2) must divide the number of processes (1)" in capsys.readouterr().err
