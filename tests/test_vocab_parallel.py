"""Vocabulary-parallel log-probs, entropy and the fused StepPO loss (``steppo_fast.vocab_parallel``):
2 (and 4) gloo processes on the CPU, each holding a slice of the lm_head or of the logits, against
the same ops on the whole weight (the fp64 reference and steppo_fast's unsharded op).

Spawned processes are slow to start, so one spawn runs every check and saves what each rank got;
the tests below compare those results in the parent. Inputs come from seeds, so the parent
rebuilds them. A gloo timeout turns a hang into a failure.
"""

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import steppo_fast as sf
from episodes import make_episodes, step_rows
from steppo_fast import StepLayout
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close, assert_no_worse_than_torch

TRITON = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ inputs (the same in every process)
def _sizes(vocab, world):
    """Megatron-like contiguous slices: the first vocab % world ranks get one more row."""
    return [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]


def _slice(vocab, world, rank):
    sizes = _sizes(vocab, world)
    s = sum(sizes[:rank])
    return slice(s, s + sizes[rank])


def _labels_everywhere(n, vocab, world, gen):
    """Random labels, with the first and last id of every shard among them."""
    y = torch.randint(0, vocab, (n,), generator=gen)
    ends = []
    for r in range(world):
        sl = _slice(vocab, world, r)
        if sl.stop > sl.start:
            ends += [sl.start, sl.stop - 1]
    y[:len(ends)] = torch.tensor(ends)
    return y


def _logits_case(vocab, dtype, world, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(3, 5, vocab, generator=g) * 2).to(dtype)
    y = _labels_everywhere(15, vocab, world, g).reshape(3, 5)
    mask = torch.rand(3, 5, generator=g) > 0.25
    mask.view(-1)[: 2 * world] = True
    y = torch.where(mask, y, torch.full_like(y, -100))
    a, b = torch.randn(3, 5, generator=g).double(), torch.randn(3, 5, generator=g).double()
    return z, y, mask, a, b


def _head_case(vocab, dtype, world, seed=2, n=20, hdim=8):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g).to(dtype)
    w = (torch.randn(vocab, hdim, generator=g) * 0.6).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    y = _labels_everywhere(n, vocab, world, g)
    mask = torch.rand(n, generator=g) > 0.3
    mask[: 2 * world] = True
    y = torch.where(mask, y, torch.full_like(y, -100))
    a, c = torch.randn(n, generator=g).double(), torch.randn(n, generator=g).double()
    return h, w, b, y, mask, a, c


def _loss_case(vocab, dtype, world, seed=3, hdim=8):
    ep = make_episodes(seed, 6, max_steps=3, max_tokens=5, group_size=2)
    mask, traj, step, grp, _ = step_rows(ep, seed)
    lay = StepLayout.from_step_rows(mask, traj, step, grp)
    B, T = mask.shape
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, hdim, generator=g).to(dtype)
    w = (torch.randn(vocab, hdim, generator=g) * 0.6).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    y = _labels_everywhere(B * T, vocab, world, g).reshape(B, T)
    y = torch.where(mask, y, torch.full_like(y, -100))
    with torch.no_grad():
        lp, _ = ref.linear_token_logprobs(h.reshape(B * T, -1).double(), w.double(), y.reshape(-1).clamp(min=0),
                                          None, 0.9, b.double())
    old = (lp.reshape(B, T) + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(torch.float32)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    ref_lp = (lp.reshape(B, T) + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(torch.float32)
    iw = (torch.rand(B, T, generator=g) + 0.5)
    return dict(h=h, w=w, b=b, y=y, layout=lay, old=old, adv=adv, ref_lp=ref_lp, iw=iw)


# The fused-loss grid: every aggregation mode at both ratio levels in fp64, the options of SPEC 7 on
# some of them, a few in fp32, one with V divisible by the group size, one with the automatic chunk.
LOSS_CASES = []
for _rl in ("token", "step"):
    for _i, _agg in enumerate(ref.AGG_MODES):
        _opt = {"ratio_level": _rl, "agg_mode": _agg, "entropy_coef": 0.01 if _i % 2 == 0 else 0.0}
        if _i == 1:
            _opt.update(kl_coef=0.1, kl_type="k3")
        if _rl == "token" and _i == 2:
            _opt["dual_clip"] = 3.0
        LOSS_CASES.append((f"fp64-V13-{_rl}-{_agg}", torch.float64, 13, _opt, dict(chunk=3, weights=_i == 3)))
for _rl in ("token", "step"):
    LOSS_CASES.append((f"fp32-V13-{_rl}", torch.float32, 13, {"ratio_level": _rl, "entropy_coef": 0.01},
                       dict(chunk=3)))
LOSS_CASES.append(("fp64-V12-step", torch.float64, 12, {"ratio_level": "step"}, dict(chunk=4)))
LOSS_CASES.append(("fp32-V13-auto-chunk", torch.float32, 13, {"ratio_level": "step"}, dict(chunk=None)))


def _loss_kwargs(c, extra):
    kw = dict(temperature=0.9, bias=None, chunk=extra["chunk"])
    if extra.get("weights"):
        kw["weights"] = c["iw"]
    return kw


# ------------------------------------------------------------------ what each rank runs
def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run_logits(rank, world, vocab, dtype, backend="auto", inplace=False):
    z, y, mask, a, b = _logits_case(vocab, dtype, world)
    zr = _leaf(z[..., _slice(vocab, world, rank)])
    if inplace:
        zr = zr.clone()  # a non-leaf buffer the backward may overwrite
        zr.retain_grad()
    lp, en = sf.vocab_parallel_token_logprobs(zr, y, mask, 0.7, process_group=dist.group.WORLD,
                                              inplace_backward=inplace, backend=backend)
    (lp.double() * a + en.double() * b).sum().backward()
    return {"logp": lp.detach(), "entropy": en.detach(), "grad": zr.grad}


def _run_linear(rank, world, vocab, dtype, reduce=True, chunk=6):
    h, w, b, y, mask, a, c = _head_case(vocab, dtype, world)
    sl = _slice(vocab, world, rank)
    hh, wr, br = _leaf(h), _leaf(w[sl]), _leaf(b[sl])
    lp, en = sf.vocab_parallel_linear_token_logprobs(hh, wr, y, mask, 1.3, br, process_group=dist.group.WORLD,
                                                     chunk=chunk, reduce_grad_hidden=reduce)
    (lp.double() * a + en.double() * c).sum().backward()
    return {"logp": lp.detach(), "entropy": en.detach(), "grad_hidden": hh.grad, "grad_weight": wr.grad,
            "grad_bias": br.grad}


def _run_loss(rank, world, dtype, vocab, opt, extra, bias=False, how="front"):
    c = _loss_case(vocab, dtype, world)
    sl = _slice(vocab, world, rank)
    hh, wr = _leaf(c["h"]), _leaf(c["w"][sl])
    kw = _loss_kwargs(c, extra)
    br = _leaf(c["b"][sl]) if bias else None
    kw["bias"] = br
    ref_lp = c["ref_lp"] if opt.get("kl_coef") else None
    group = _mesh(world) if how == "mesh" else dist.group.WORLD  # a 1-D DeviceMesh or a ProcessGroup
    if how == "module":
        mod = sf.StepPOLoss(opt, temperature=kw["temperature"], chunk=kw["chunk"], process_group=dist.group.WORLD)
        loss, m = mod(hh, c["y"], c["layout"], c["old"], c["adv"], weight=wr, bias=br, weights=kw.get("weights"),
                      ref_logp=ref_lp)
    else:
        loss, m = sf.vocab_parallel_linear_steppo_loss(hh, wr, c["y"], c["layout"], c["old"], c["adv"], opt,
                                                       process_group=group, ref_logp=ref_lp, **kw)
    loss.backward()
    out = {"loss": loss.detach(), "metrics": {k: v.detach() for k, v in m.items()}, "grad_hidden": hh.grad,
           "grad_weight": wr.grad}
    if bias:
        out["grad_bias"] = br.grad
    return out


def _run_logits_module(rank, world):
    """StepPOLoss(process_group=...) on logits shards: vocab-parallel log-probs, then the policy loss."""
    c = _loss_case(13, torch.float64, world)
    B, T = c["y"].shape
    z = (c["h"].reshape(B * T, -1) @ c["w"].T + c["b"]).reshape(B, T, -1)
    zr = _leaf(z[..., _slice(13, world, rank)])
    loss, _ = sf.StepPOLoss("steppo", temperature=0.9, process_group=dist.group.WORLD)(zr, c["y"], c["layout"],
                                                                                       c["old"], c["adv"])
    loss.backward()
    return {"loss": loss.detach(), "grad": zr.grad}


def _run_cross_entropy(rank, world):
    """verl's signature: grad_hidden is left as each rank's part (summed in the parent)."""
    h, w, _, y, _, a, c = _head_case(13, torch.float64, world, seed=5)
    y = y.clamp(min=0)
    hh, wr = _leaf(h), _leaf(w[_slice(13, world, rank)])
    lp, en = sf.linear_cross_entropy(hh, wr, y, 1.1, "none", dist.group.WORLD)
    (lp * a + en * c).sum().backward()
    return {"logp": lp.detach(), "entropy": en.detach(), "grad_hidden": hh.grad, "grad_weight": wr.grad}


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _run_dtensor(rank, world):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    c = _loss_case(13, torch.float64, world)
    out = {}
    # Shard(0): torch's ColwiseParallel lm_head (uneven: 7 + 6 rows), through every front.
    for name, place in (("shard", Shard(0)), ("replicate", Replicate())):
        wd = distribute_tensor(c["w"], mesh, [place]).requires_grad_(True)
        bd = distribute_tensor(c["b"], mesh, [place]).requires_grad_(True)
        hh = _leaf(c["h"])
        loss, _ = sf.linear_steppo_loss(hh, wd, c["y"], c["layout"], c["old"], c["adv"], {"entropy_coef": 0.01},
                                        temperature=0.9, bias=bd, chunk=3)
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_hidden": hh.grad, "grad_weight": wd.grad.to_local(),
                     "grad_bias": bd.grad.to_local(), "local_rows": wd.to_local().shape[0]}
        hh = _leaf(c["h"])
        wd.grad = None
        loss2, _ = sf.StepPOLoss({"entropy_coef": 0.01}, temperature=0.9, chunk=3)(
            hh, c["y"], c["layout"], c["old"], c["adv"], weight=wd, bias=bd)
        out[name]["module_loss"] = loss2.detach()
        hh = _leaf(c["h"])
        lp, en = sf.linear_token_logprobs(hh, wd, c["y"], c["layout"], 0.9, bd)
        out[name]["logp"], out[name]["entropy"] = lp.detach(), en.detach()
    # Shard(-1) logits: torch's loss-parallel logits.
    B, T = c["y"].shape
    z = (c["h"].reshape(B * T, -1) @ c["w"].T).reshape(B, T, -1)
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_(True)
    lp, en = sf.token_logprobs(zd, c["y"], c["layout"], 0.9)
    (lp + 0.5 * en).sum().backward()
    out["logits"] = {"logp": lp.detach(), "entropy": en.detach(), "grad": zd.grad.to_local()}
    return out


def _run_fsdp(rank, world):
    """fully_shard on the lm_head: the weight is Shard(0) over data-parallel ranks holding different
    tokens, so it is gathered and its gradient averaged (FSDP2's reduction)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    c = _loss_case(13, torch.float64, world)
    lin = torch.nn.Linear(c["w"].shape[1], 13, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(c["w"])
    fully_shard(lin, mesh=mesh)
    hh = _leaf(c["h"] * (1.0 + rank))  # each rank its own data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = sf.linear_steppo_loss(hh, lin.weight, c["y"], c["layout"], c["old"], c["adv"], temperature=0.9,
                                        chunk=3)
    loss.backward()
    return {"loss": loss.detach(), "grad_hidden": hh.grad, "grad_weight": lin.weight.grad.to_local(),
            "warned": any("gathering it" in str(w.message) for w in caught)}


def _run_repro(rank, world):
    runs = [_run_loss(rank, world, torch.float32, 13, {"ratio_level": "step", "entropy_coef": 0.01},
                      dict(chunk=3), bias=True) for _ in range(2)]
    return runs


def _expect_error(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _run_errors(rank, world):
    g = dist.group.WORLD
    c = _loss_case(13, torch.float64, world)
    sl = _slice(13, world, rank)
    h, w, y, lay = c["h"], c["w"], c["y"], c["layout"]

    def loss(hidden=h, weight=w[sl], labels=y, **kw):
        return sf.vocab_parallel_linear_steppo_loss(hidden, weight, labels, lay, c["old"], c["adv"],
                                                    process_group=kw.pop("group", g), **kw)

    out = {}
    # The last rank's shard has H - 1 columns: only that rank can see it, every rank must raise.
    out["unequal_h"] = _expect_error(lambda: loss(weight=w[sl, :-1] if rank == world - 1 else w[sl]))
    # Every rank's H agrees with its hidden states, but the ranks disagree with each other.
    wide = torch.cat([h, h[..., :1]], -1)
    wide_w = torch.cat([w[sl], w[sl, :1]], -1)
    out["h_across_ranks"] = _expect_error(lambda: loss(hidden=wide if rank == 0 else h,
                                                       weight=wide_w if rank == 0 else w[sl]))
    bad = y.clone()
    bad[lay.token_mask.reshape(y.shape)] = 13  # a masked-in label outside [0, V)
    out["label"] = _expect_error(lambda: loss(labels=bad))
    out["tokens"] = _expect_error(lambda: loss(hidden=h + rank))
    out["dtype"] = _expect_error(lambda: loss(weight=w[sl].float() if rank == 1 else w[sl]))
    out["not_a_group"] = _expect_error(lambda: loss(group="world"))
    # A 2-D mesh: the weight split over "tp", process_group the "dp" dimension's group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("tp", "dp"))
    wd = distribute_tensor(w, mesh2, [Shard(0), Replicate()])
    out["mesh_group"] = _expect_error(lambda: sf.vocab_parallel_linear_steppo_loss(
        h, wd, y, lay, c["old"], c["adv"], process_group=mesh2["dp"]))
    mesh1 = _mesh(world)
    wp = distribute_tensor(w, mesh1, [Shard(1)])
    out["placement"] = _expect_error(lambda: sf.linear_steppo_loss(h, wp, y, lay, c["old"], c["adv"]))
    out["partial"] = _expect_error(lambda: sf.linear_token_logprobs(h, DTensor.from_local(w, mesh1, [Partial()]), y,
                                                                    lay))
    # After all that the group still works.
    out["after"] = _run_loss(rank, world, torch.float64, 13, {"ratio_level": "step"}, dict(chunk=3))
    return out


def _run_triton(rank, world):
    out = {"logits": _run_logits(rank, world, 13, torch.float32, backend="triton")}
    c = _loss_case(13, torch.float32, world)
    hh, wr = _leaf(c["h"]), _leaf(c["w"][_slice(13, world, rank)])
    loss, _ = sf.vocab_parallel_linear_steppo_loss(hh, wr, c["y"], c["layout"], c["old"], c["adv"],
                                                   {"entropy_coef": 0.01}, process_group=dist.group.WORLD,
                                                   temperature=0.9, chunk=3, backend="triton")
    loss.backward()
    out["loss"] = {"loss": loss.detach(), "grad_hidden": hh.grad, "grad_weight": wr.grad}
    return out


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).double(), torch.randint(0, 61, (3, 10))


def _run_verl(rank, world):
    """verl's fused-kernel forward with the lm_head split: this rank's rows plus the group, or a DTensor."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from steppo_fast.integrations import verl as sv

    out = {}
    for kind in ("rows", "dtensor"):
        model, ids = _tiny_qwen2()
        full = model.lm_head.weight.detach()
        if kind == "rows":
            head = torch.nn.Linear(32, full.shape[0], bias=False, dtype=full.dtype)
            head.weight = torch.nn.Parameter(full[_slice(61, world, rank)].clone())
            model.lm_head = head
            sv.use_fused_head(model, process_group=dist.group.WORLD)
        else:
            model.lm_head.weight = torch.nn.Parameter(distribute_tensor(full, _mesh(world), [Shard(0)]))
            sv.use_fused_head(model)
        res = model(input_ids=ids, attention_mask=torch.ones_like(ids), temperature=0.7)
        (res.log_probs.sum() + 0.5 * res.entropy.sum()).backward()
        gw = model.lm_head.weight.grad
        out[kind] = {"logp": res.log_probs.detach(), "entropy": res.entropy.detach(),
                     "grad_head": gw.to_local() if kind == "dtensor" else gw,
                     "grad_embed": model.model.embed_tokens.weight.grad}
    return out


def _suite_two(rank, world):
    res = {}
    for dt in (torch.float64, torch.float32):
        for v in (12, 13):
            res[f"logits-{dt}-{v}"] = lambda dt=dt, v=v: _run_logits(rank, world, v, dt)
            res[f"linear-{dt}-{v}"] = lambda dt=dt, v=v: _run_linear(rank, world, v, dt)
    res["logits-inplace"] = lambda: _run_logits(rank, world, 13, torch.float32, inplace=True)
    res["logits-reference"] = lambda: _run_logits(rank, world, 13, torch.float64, backend="reference")
    res["linear-partial-grad"] = lambda: _run_linear(rank, world, 13, torch.float64, reduce=False)
    res["linear-auto-chunk"] = lambda: _run_linear(rank, world, 13, torch.float32, chunk=None)
    for name, dt, v, opt, extra in LOSS_CASES:
        res[f"loss-{name}"] = lambda dt=dt, v=v, opt=opt, extra=extra: _run_loss(rank, world, dt, v, opt, extra)
    res["loss-bias"] = lambda: _run_loss(rank, world, torch.float64, 13, {"ratio_level": "step"}, dict(chunk=3),
                                         bias=True)
    res["loss-module"] = lambda: _run_loss(rank, world, torch.float64, 13, {"ratio_level": "step"}, dict(chunk=3),
                                           how="module")
    res["loss-mesh"] = lambda: _run_loss(rank, world, torch.float64, 13, {"ratio_level": "token"}, dict(chunk=3),
                                         how="mesh")
    res["loss-logits-module"] = lambda: _run_logits_module(rank, world)
    res["cross-entropy"] = lambda: _run_cross_entropy(rank, world)
    res["dtensor"] = lambda: _run_dtensor(rank, world)
    res["fsdp"] = lambda: _run_fsdp(rank, world)
    res["repro"] = lambda: _run_repro(rank, world)
    res["errors"] = lambda: _run_errors(rank, world)
    res["verl"] = lambda: _run_verl(rank, world)
    if TRITON:
        res["triton"] = lambda: _run_triton(rank, world)
    return res


def _suite_four(rank, world):
    return {
        "logits-fp64-13": lambda: _run_logits(rank, world, 13, torch.float64),
        # V = 3 over 4 ranks: one rank holds an empty slice.
        "linear-fp64-3": lambda: _run_linear(rank, world, 3, torch.float64),
        "loss-fp64-3": lambda: _run_loss(rank, world, torch.float64, 3, {"ratio_level": "step", "entropy_coef": 0.01},
                                         dict(chunk=3)),
    }


SUITES = {"two": _suite_two, "four": _suite_four}


def _worker(rank, world, suite, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    try:
        for name, fn in SUITES[suite](rank, world).items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    res[name] = fn()
            except Exception as exc:  # reported by the test of that name
                res[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _spawn(tmp_path_factory, suite, world):
    d = tmp_path_factory.mktemp(f"vp_{suite}")
    mp.spawn(_worker, args=(world, suite, str(d / "init"), str(d)), nprocs=world, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn(tmp_path_factory, "two", 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _spawn(tmp_path_factory, "four", 4)


def _get(results, name):
    out = [r[name] for r in results]
    for r, o in enumerate(out):
        if isinstance(o, dict) and "error" in o:
            pytest.fail(f"rank {r}: {o['error']}")
    return out


# ------------------------------------------------------------------ references (in the parent)
def _ref_logits(vocab, dtype, world):
    z, y, mask, a, b = _logits_case(vocab, dtype, world)
    zl = _leaf(z.double())
    lp, en = ref.token_logprobs(zl.reshape(-1, vocab), y.reshape(-1), mask.reshape(-1), 0.7)
    (lp * a.reshape(-1) + en * b.reshape(-1)).sum().backward()
    zt = _leaf(z)  # PyTorch in the inputs' dtype: the yardstick for gradients
    lt, et = ref.token_logprobs(zt.reshape(-1, vocab), y.reshape(-1), mask.reshape(-1), 0.7)
    (lt * a.reshape(-1).to(lt.dtype) + et * b.reshape(-1).to(lt.dtype)).sum().backward()
    return lp.reshape(3, 5), en.reshape(3, 5), zl.grad, zt.grad


def _check_logits(results, vocab, dtype, world):
    lp, en, g64, gt = _ref_logits(vocab, dtype, world)
    for r, out in enumerate(results):
        assert_close(out["logp"], lp, msg=f"rank {r} logp")
        assert_close(out["entropy"], en, msg=f"rank {r} entropy")
        sl = _slice(vocab, world, r)
        assert out["grad"].dtype == dtype and out["grad"].shape == g64[..., sl].shape
        assert_no_worse_than_torch(out["grad"], gt[..., sl], g64[..., sl], msg=f"rank {r} grad logits")
        # Same bits on every rank.
        assert torch.equal(out["logp"], results[0]["logp"]) and torch.equal(out["entropy"], results[0]["entropy"])


def _ref_linear(vocab, dtype, world, seed=2, tau=1.3, use_bias=True, use_mask=True):
    h, w, b, y, mask, a, c = _head_case(vocab, dtype, world, seed=seed)
    outs = []
    for fp64 in (True, False):
        cast = (lambda t: t.double()) if fp64 else (lambda t: t)
        hl, wl, bl = _leaf(cast(h)), _leaf(cast(w)), _leaf(cast(b))
        lp, en = ref.linear_token_logprobs(hl, wl, y.clamp(min=0), mask if use_mask else None, tau,
                                           bl if use_bias else None)
        (lp * a.to(lp.dtype) + en * c.to(lp.dtype)).sum().backward()
        outs.append((lp.detach(), en.detach(), hl.grad, wl.grad, bl.grad))
    return outs


def _check_linear(results, vocab, dtype, world, reduce=True):
    (lp, en, gh, gw, gb), (_, _, th, tw, tb) = _ref_linear(vocab, dtype, world)
    if not reduce:  # each rank's part of grad_hidden; their sum is the whole gradient
        part = sum(r["grad_hidden"] for r in results)
        assert_close(part, gh)
        assert not torch.allclose(results[0]["grad_hidden"], gh)
    for r, out in enumerate(results):
        sl = _slice(vocab, world, r)
        assert_close(out["logp"], lp, msg=f"rank {r} logp")
        assert_close(out["entropy"], en, msg=f"rank {r} entropy")
        if reduce:
            assert_no_worse_than_torch(out["grad_hidden"], th, gh, msg=f"rank {r} grad hidden")
        assert_no_worse_than_torch(out["grad_weight"], tw[sl], gw[sl], msg=f"rank {r} grad weight")
        assert_no_worse_than_torch(out["grad_bias"], tb[sl], gb[sl], msg=f"rank {r} grad bias")


def _ref_loss(vocab, dtype, world, opt, extra, bias=False, data_scale=1.0):
    """The unsharded loss: steppo_fast's reference backend in fp64 (the oracle) and steppo_fast's
    default backend in the inputs' dtype (the same op on the whole weight)."""
    c = _loss_case(vocab, dtype, world)
    kw = _loss_kwargs(c, extra)
    ref_lp = c["ref_lp"] if opt.get("kl_coef") else None
    outs = []
    for backend, cast in (("reference", lambda t: t.double()), ("auto", lambda t: t)):
        hl, wl = _leaf(cast(c["h"] * data_scale)), _leaf(cast(c["w"]))
        bl = _leaf(cast(c["b"])) if bias else None
        kw2 = {**kw, "bias": bl}
        loss, m = sf.linear_steppo_loss(hl, wl, c["y"], c["layout"], c["old"], c["adv"], opt, ref_logp=ref_lp,
                                        backend=backend, **kw2)
        loss.backward()
        outs.append({"loss": loss.detach(), "metrics": m, "grad_hidden": hl.grad, "grad_weight": wl.grad,
                     "grad_bias": None if bl is None else bl.grad})
    return outs


def _check_loss(results, vocab, dtype, world, opt, extra, bias=False, tol_dtype=None):
    want, same = _ref_loss(vocab, dtype, world, opt, extra, bias)
    for r, out in enumerate(results):
        sl = _slice(vocab, world, r)
        td = tol_dtype or dtype
        assert_close(out["loss"], want["loss"], dtype=td, msg=f"rank {r} loss")
        if "metrics" in out:
            for k, v in want["metrics"].items():
                assert_close(out["metrics"][k], v, dtype=td, msg=f"rank {r} metric {k}")
        names = ["grad_hidden", "grad_weight"] + (["grad_bias"] if bias else [])
        for name in names:
            cut = (lambda t: t) if name == "grad_hidden" else (lambda t: t[sl])
            g = out[name]
            assert g.dtype == dtype and g.shape == cut(want[name]).shape, name
            if dtype == torch.float64:
                assert_close(g, cut(want[name]), msg=f"rank {r} {name}")
            else:
                assert_no_worse_than_torch(g, cut(same[name]), cut(want[name]), msg=f"rank {r} {name}")
                assert_close(g, cut(same[name]), msg=f"rank {r} {name} against the unsharded op")
        assert torch.equal(out["loss"], results[0]["loss"])
        assert torch.equal(out["grad_hidden"], results[0]["grad_hidden"])


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("vocab", [12, 13], ids=["V-divisible", "V-uneven"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_token_logprobs_from_logits_shards(two, vocab, dtype):
    _check_logits(_get(two, f"logits-{dtype}-{vocab}"), vocab, dtype, 2)


def test_token_logprobs_inplace_backward_and_reference_backend(two):
    _check_logits(_get(two, "logits-inplace"), 13, torch.float32, 2)
    _check_logits(_get(two, "logits-reference"), 13, torch.float64, 2)


@pytest.mark.parametrize("vocab", [12, 13], ids=["V-divisible", "V-uneven"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_linear_token_logprobs_from_weight_shards(two, vocab, dtype):
    _check_linear(_get(two, f"linear-{dtype}-{vocab}"), vocab, dtype, 2)


def test_linear_token_logprobs_partial_grad_hidden_and_auto_chunk(two):
    _check_linear(_get(two, "linear-partial-grad"), 13, torch.float64, 2, reduce=False)
    _check_linear(_get(two, "linear-auto-chunk"), 13, torch.float32, 2)


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_linear_steppo_loss_from_weight_shards(two, case):
    name, dtype, vocab, opt, extra = case
    _check_loss(_get(two, f"loss-{name}"), vocab, dtype, 2, opt, extra)


def test_linear_steppo_loss_bias_module_and_device_mesh(two):
    _check_loss(_get(two, "loss-bias"), 13, torch.float64, 2, {"ratio_level": "step"}, dict(chunk=3), bias=True)
    _check_loss(_get(two, "loss-module"), 13, torch.float64, 2, {"ratio_level": "step"}, dict(chunk=3))
    _check_loss(_get(two, "loss-mesh"), 13, torch.float64, 2, {"ratio_level": "token"}, dict(chunk=3))


def test_steppo_loss_module_on_logits_shards(two):
    c = _loss_case(13, torch.float64, 2)
    B, T = c["y"].shape
    z = _leaf((c["h"].reshape(B * T, -1) @ c["w"].T + c["b"]).reshape(B, T, -1))
    lp, _ = ref.token_logprobs(z.reshape(B * T, -1), c["y"].reshape(-1), c["layout"].token_mask, 0.9)
    loss, _ = sf.policy_loss(lp.reshape(B, T), c["old"].double(), c["adv"].double(), c["layout"], backend="reference")
    loss.backward()
    for r, out in enumerate(_get(two, "loss-logits-module")):
        assert_close(out["loss"], loss)
        assert_close(out["grad"], z.grad[..., _slice(13, 2, r)])


def test_linear_cross_entropy_with_dist_process_group(two):
    results = _get(two, "cross-entropy")
    h, w, _, y, _, a, c = _head_case(13, torch.float64, 2, seed=5)
    hl, wl = _leaf(h), _leaf(w)
    lp, en = ref.linear_token_logprobs(hl, wl, y.clamp(min=0), None, 1.1)
    (lp * a + en * c).sum().backward()
    assert_close(sum(r["grad_hidden"] for r in results), hl.grad)  # verl's convention: parts, summed later
    for r, out in enumerate(results):
        assert_close(out["logp"], lp)
        assert_close(out["entropy"], en)
        assert_close(out["grad_weight"], wl.grad[_slice(13, 2, r)])


def test_dtensor_weight_sharded_replicated_and_logits(two):
    results = _get(two, "dtensor")
    opt, extra = {"entropy_coef": 0.01}, dict(chunk=3)
    for kind in ("shard", "replicate"):
        per_rank = [r[kind] for r in results]
        want, _ = _ref_loss(13, torch.float64, 2, opt, extra, bias=True)
        c = _loss_case(13, torch.float64, 2)
        lp, en = ref.linear_token_logprobs(c["h"].reshape(-1, 8), c["w"], c["y"].reshape(-1).clamp(min=0),
                                           c["layout"].token_mask, 0.9, c["b"])
        for r, out in enumerate(per_rank):
            # distribute_tensor's Shard(0) of 13 rows over 2 ranks: 7 and 6, as _slice.
            sl = _slice(13, 2, r) if kind == "shard" else slice(0, 13)
            assert out["local_rows"] == sl.stop - sl.start
            assert_close(out["loss"], want["loss"])
            assert_close(out["module_loss"], want["loss"])
            assert_close(out["grad_hidden"], want["grad_hidden"])
            assert_close(out["grad_weight"], want["grad_weight"][sl])
            assert_close(out["grad_bias"], want["grad_bias"][sl])
            assert_close(out["logp"], lp.reshape(out["logp"].shape))
            assert_close(out["entropy"], en.reshape(out["entropy"].shape))
    c = _loss_case(13, torch.float64, 2)
    B, T = c["y"].shape
    z = _leaf((c["h"].reshape(B * T, -1) @ c["w"].T))
    lp, en = ref.token_logprobs(z, c["y"].reshape(-1), c["layout"].token_mask, 0.9)
    (lp + 0.5 * en).sum().backward()
    for r, out in enumerate(results):
        assert_close(out["logits"]["logp"], lp.reshape(B, T))
        assert_close(out["logits"]["entropy"], en.reshape(B, T))
        assert_close(out["logits"]["grad"], z.grad.reshape(B, T, -1)[..., _slice(13, 2, r)])


def test_fsdp2_sharded_weight_is_gathered_and_its_gradient_averaged(two):
    results = _get(two, "fsdp")
    per_rank = [_ref_loss(13, torch.float64, 2, {}, dict(chunk=3), data_scale=1.0 + r)[0] for r in range(2)]
    mean_gw = (per_rank[0]["grad_weight"] + per_rank[1]["grad_weight"]) / 2
    for r, out in enumerate(results):
        assert out["warned"]
        assert_close(out["loss"], per_rank[r]["loss"])
        assert_close(out["grad_hidden"], per_rank[r]["grad_hidden"])
        assert_close(out["grad_weight"], mean_gw[_slice(13, 2, r)])
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])


def test_bitwise_reproducible_across_runs_and_ranks(two):
    results = _get(two, "repro")
    for runs in results:
        first, second = runs
        for k in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
            assert torch.equal(first[k], second[k]), k
        for k in first["metrics"]:
            assert torch.equal(first["metrics"][k], second["metrics"][k]), k
    assert torch.equal(results[0][0]["loss"], results[1][0]["loss"])
    assert torch.equal(results[0][0]["grad_hidden"], results[1][0]["grad_hidden"])
    _check_loss([r[0] for r in results], 13, torch.float32, 2, {"ratio_level": "step", "entropy_coef": 0.01},
                dict(chunk=3), bias=True)


@pytest.mark.parametrize("case, pattern", [
    ("unequal_h", r"ValueError: .*H = 7 but the hidden states have H = 8"),
    ("h_across_ranks", r"ValueError: .*hidden size H of the hidden states differs across the ranks"),
    ("label", r"ValueError: .*label is outside \[0, 13\)"),
    ("tokens", r"ValueError: .*hold different tokens \(hidden states differ\)"),
    ("dtype", r"ValueError: .*rank 1: the weight's dtype differs"),
    ("not_a_group", r"TypeError: process_group must be"),
    ("mesh_group", r"ValueError: .*process_group does not match the group of the mesh dimension"),
    ("placement", r"ValueError: weight is a DTensor with placements .*Shard\(dim=1\)"),
    ("partial", r"ValueError: weight is a DTensor with placements .*Partial"),
])
def test_bad_input_raises_on_every_rank(two, case, pattern):
    import re

    for r, out in enumerate(_get(two, "errors")):
        assert re.search(pattern, out[case]), f"rank {r}: {out[case]}"


def test_group_still_works_after_errors(two):
    _check_loss([r["after"] for r in _get(two, "errors")], 13, torch.float64, 2, {"ratio_level": "step"},
                dict(chunk=3))


def test_verl_fused_forward_with_a_vocabulary_split_head(two):
    model, ids = _tiny_qwen2()
    hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    lp, en = ref.linear_token_logprobs(hidden.reshape(30, -1), model.lm_head.weight, torch.roll(ids, -1, -1).reshape(-1),
                                       None, 0.7)
    (lp.sum() + 0.5 * en.sum()).backward()
    for r, out in enumerate(_get(two, "verl")):
        for kind in ("rows", "dtensor"):
            got = out[kind]
            assert_close(got["logp"], lp.reshape(3, 10), msg=kind)
            assert_close(got["entropy"], en.reshape(3, 10), msg=kind)
            assert_close(got["grad_head"], model.lm_head.weight.grad[_slice(61, 2, r)], msg=kind)
            assert_close(got["grad_embed"], model.model.embed_tokens.weight.grad, msg=kind)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="Triton kernels run on the CPU only under TRITON_INTERPRET=1")
def test_triton_shard_kernels(two):
    results = _get(two, "triton")
    _check_logits([r["logits"] for r in results], 13, torch.float32, 2)
    _check_loss([r["loss"] for r in results], 13, torch.float32, 2, {"entropy_coef": 0.01}, dict(chunk=3))


@pytest.mark.slow
def test_four_ranks_with_an_empty_shard(four):
    _check_logits(_get(four, "logits-fp64-13"), 13, torch.float64, 4)
    assert _sizes(3, 4) == [1, 1, 1, 0]
    _check_linear(_get(four, "linear-fp64-3"), 3, torch.float64, 4)
    _check_loss(_get(four, "loss-fp64-3"), 3, torch.float64, 4, {"ratio_level": "step", "entropy_coef": 0.01},
                dict(chunk=3))
