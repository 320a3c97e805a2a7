"""The vocabulary-parallel fused StepPO loss and log-probs (``steppo_fast.vocab_parallel``): per-rank
time and peak memory with the lm_head split over ``--world`` processes, against the same op on
the whole head in one process.

Every rank holds the same hidden states (N, H) and V / world rows of the weight. The fused loss
does three N x H x V / world products per rank and, per chunk of tokens, one all-gather of three
float64 per token; grad_hidden is summed by one all-reduce of N x H. Targets (a benchmark, not
a test): per-rank peak memory about half the single-process op's at world 2, and per-rank time no
worse than 1.2 x (single-process time / world) + the collectives' time, which is measured on its
own (the same all-gathers and all-reduce, on the same group, without the products).

CPU: ``--world`` gloo processes with ``--threads`` threads each; the single-process baseline runs
with the same thread count (so half the single-process time is the ideal per-rank time) and,
for reference, with ``--threads * --world`` threads. GPU: one process per device over nccl when
there are ``--world`` devices; on a single GPU the ranks share it and talk over gloo
(``--backend gloo``: this checks the path; its timings say little).

    python -m benchmarks.bench_vocab_parallel                      # N=2048 H=512 V=32000 fp32, 2 ranks
    python -m benchmarks.bench_vocab_parallel --device cuda --n 16384 --hidden 4096 --vocab 151936 --dtype bf16

Peak memory: the harness's measure (CUDA: ``max_memory_allocated``; CPU: the profiler's
allocations during one call), beyond what is live before the call (inputs, the weight shard).
Timings: the median of ``--repeats`` calls after one warm-up, each call started together on all
ranks (a barrier); a rank's time is its own wall time of the call, and the table shows the
slowest rank. ``cpu_ms`` is the CPU time of the process during the call (all its threads): on a
machine shared with other jobs, wall time counts the waits for a core and CPU time the work. Results go to ``benchmarks/results/vocab_parallel_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

from .harness import markdown_table, peak_memory_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def _batch(n: int, hidden: int, vocab: int, dtype, device, tokens_per_step: int = 256) -> Dict[str, Any]:
    """Step rows of ``tokens_per_step`` agent tokens each (every token an agent token); behaviour
    log-probs near the current ones, so some steps clip. The same on every rank (seeded)."""
    import steppo_fast as sf

    g = torch.Generator().manual_seed(0)
    T = min(tokens_per_step, n)
    B = n // T
    h = torch.randn(B, T, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2.0
    y = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    noise = 0.05 * torch.randn(B, T, generator=g)
    lay = sf.StepLayout.from_step_rows(mask, torch.arange(B), torch.zeros(B, dtype=torch.long)).to(device)
    h, w, y = h.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), y.to(device)
    with torch.no_grad():
        lp, _ = sf.linear_token_logprobs(h, w, y, lay, with_entropy=False, validate=False)
    return {"h": h, "w": w, "y": y, "layout": lay, "old": (lp.float() + noise.to(device)), "adv": adv.to(device)}


def _call(op: str, s: Dict[str, Any], weight, group):
    """One forward + backward; returns what it computed (for the error check)."""
    import steppo_fast as sf

    h = s["h"].detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    if op == "loss":
        if group is None:
            loss, _ = sf.linear_steppo_loss(h, w, s["y"], s["layout"], s["old"], s["adv"], validate=False)
        else:
            loss, _ = sf.vocab_parallel_linear_steppo_loss(h, w, s["y"], s["layout"], s["old"], s["adv"],
                                                           process_group=group, validate=False)
        gh, gw = torch.autograd.grad(loss, [h, w])
        return loss.detach(), gh, gw
    if group is None:
        lp, en = sf.linear_token_logprobs(h, w, s["y"], s["layout"], validate=False)
    else:
        lp, en = sf.vocab_parallel_linear_token_logprobs(h, w, s["y"], s["layout"], process_group=group,
                                                         validate=False)
    gh, gw = torch.autograd.grad(lp.sum() + en.sum(), [h, w])
    return lp.detach(), gh, gw


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _times(fn, device: str, repeats: int, barrier=None) -> List[float]:
    """Wall ms of each of ``repeats`` calls after a warm-up (see :func:`_timed`)."""
    return _timed(fn, device, repeats, barrier)[0]


def _timed(fn, device: str, repeats: int, barrier=None):
    """(wall ms, CPU ms) of each call: the CPU time of the whole process (every thread) tells the
    work done on a machine shared with other jobs, where wall time also counts the waits."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def _collectives(s: Dict[str, Any], group, device: str, repeats: int, barrier) -> float:
    """Median ms of the collectives the fused loss makes, alone: the up-front all-gather, one
    all-gather of (3, chunk) float64 per chunk, one all-reduce of grad_hidden (N x H)."""
    import torch.distributed as dist

    from steppo_fast import linear_head
    from steppo_fast import tensor_parallel as tp

    world = dist.get_world_size(group)
    n, hdim = s["h"].shape[0] * s["h"].shape[1], s["h"].shape[2]
    chunk = linear_head.auto_chunk(s["w"].shape[0], s["h"].dtype, s["h"].device)
    bounds, _ = linear_head.plan_chunks(n, chunk, s["layout"].host_step_token_offsets().tolist())
    stats = [torch.zeros(3 * (b1 - b0), dtype=torch.float64, device=device) for b0, b1 in zip(bounds, bounds[1:])]
    outs = [torch.empty(world * t.numel(), dtype=torch.float64, device=device) for t in stats]
    table = torch.zeros(20, dtype=torch.float64, device=device)
    table_out = torch.empty(world * 20, dtype=torch.float64, device=device)
    gh = torch.zeros(n, hdim, dtype=s["h"].dtype, device=device)

    def run():
        tp.all_gather_flat(table_out, table, group)
        table_out.cpu()
        for t, o in zip(stats, outs):
            tp.all_gather_flat(o, t, group)
        dist.all_reduce(gh, group=group)

    return statistics.median(_times(run, device, repeats, barrier))


def _worker(rank: int, world: int, args: Dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    device = args["device"]
    torch.set_num_threads(args["threads"])
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(args["backend"], init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        group = dist.group.WORLD
        s = _batch(args["n"], args["hidden"], args["vocab"], DTYPES[args["dtype"]], device)
        rows = torch.arange(args["vocab"]).chunk(world)[rank]
        shard = s["w"][rows[0]:rows[-1] + 1].contiguous() if rows.numel() else s["w"][:0]
        res = {"rank": rank, "shard_rows": shard.shape[0]}
        for op in args["ops"]:
            outs = _call(op, s, shard, group)
            ms, cpu = _timed(lambda: _call(op, s, shard, group), device, args["repeats"], dist.barrier)
            dist.barrier()
            peak = peak_memory_bytes(lambda: _call(op, s, shard, group), device)
            res[op] = {"median_ms": statistics.median(ms), "cpu_ms": statistics.median(cpu), "peak_MiB": peak / 2 ** 20,
                       "value": outs[0].cpu(), "grad_hidden": outs[1].float().cpu(),
                       "grad_weight": outs[2].float().cpu(), "rows": (int(rows[0]) if rows.numel() else 0)}
        res["collectives_ms"] = _collectives(s, group, device, args["repeats"], dist.barrier)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single(args: Dict[str, Any], threads: int) -> Dict[str, Any]:
    device = args["device"]
    torch.set_num_threads(threads)
    s = _batch(args["n"], args["hidden"], args["vocab"], DTYPES[args["dtype"]], device)
    res = {}
    for op in args["ops"]:
        outs = _call(op, s, s["w"], None)
        ms, cpu = _timed(lambda: _call(op, s, s["w"], None), device, args["repeats"])
        peak = peak_memory_bytes(lambda: _call(op, s, s["w"], None), device)
        res[op] = {"median_ms": statistics.median(ms), "cpu_ms": statistics.median(cpu), "peak_MiB": peak / 2 ** 20,
                   "value": outs[0].cpu(),
                   "grad_hidden": outs[1].float().cpu(), "grad_weight": outs[2].float().cpu()}
    return res


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def main(argv=None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world", type=int, default=2, help="processes, each holding vocab / world rows of the head")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (and of the baseline)")
    p.add_argument("--n", type=int, default=2048, help="tokens (all agent tokens, steps of 256)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--ops", default="loss,logprobs", help="comma list of: loss (fused StepPO loss), logprobs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl with one GPU per rank, else gloo")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    backend = a.backend
    if backend == "auto":
        backend = "nccl" if a.device == "cuda" and torch.cuda.device_count() >= a.world else "gloo"
    args = dict(device=a.device, world=a.world, threads=a.threads, n=a.n, hidden=a.hidden, vocab=a.vocab,
                dtype=a.dtype, ops=[o for o in a.ops.split(",") if o], repeats=a.repeats, backend=backend)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    single = _single(args, a.threads)
    single_all = _single(args, a.threads * a.world) if a.device == "cpu" else None
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(a.world, args, d), nprocs=a.world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(a.world)]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    size = {"N": a.n, "H": a.hidden, "V": a.vocab, "dtype": a.dtype}
    rows = []
    coll = max(r["collectives_ms"] for r in ranks)
    for op in args["ops"]:
        name = {"loss": "linear_steppo_loss fwd+bwd", "logprobs": "linear_token_logprobs fwd+bwd"}[op]
        base = single[op]
        rows.append({"op": name, **size, "variant": f"single process, {a.threads} thread(s)",
                     "median_ms": base["median_ms"], "cpu_ms": base["cpu_ms"], "peak_MiB": base["peak_MiB"]})
        if single_all is not None:
            rows.append({"op": name, **size, "variant": f"single process, {a.threads * a.world} thread(s)",
                         "median_ms": single_all[op]["median_ms"], "cpu_ms": single_all[op]["cpu_ms"],
                         "peak_MiB": single_all[op]["peak_MiB"]})
        slow = max(r[op]["median_ms"] for r in ranks)
        target = 1.2 * base["median_ms"] / a.world + coll
        err = 0.0
        for r in ranks:
            sl = slice(r[op]["rows"], r[op]["rows"] + r["shard_rows"])
            err = max(err, _max_diff(r[op]["value"], base["value"]), _max_diff(r[op]["grad_hidden"],
                      base["grad_hidden"]), _max_diff(r[op]["grad_weight"], base["grad_weight"][sl]))
        rows.append({"op": name, **size, "variant": f"vocab-parallel, {a.world} ranks x {a.threads} thread(s)"
                     f" ({backend}), slowest rank", "median_ms": slow,
                     "cpu_ms": max(r[op]["cpu_ms"] for r in ranks),
                     "peak_MiB": max(r[op]["peak_MiB"] for r in ranks), "collectives_ms": coll,
                     "target_ms": target, "meets_target": slow <= target,
                     "cpu_vs_half_single": max(r[op]["cpu_ms"] for r in ranks) / (base["cpu_ms"] / a.world),
                     "peak_vs_single": max(r[op]["peak_MiB"] for r in ranks) / base["peak_MiB"],
                     "max_abs_diff_vs_single": err})
    note = (f"Per-rank peak memory and time of the vocabulary-parallel op against the same op on the whole head "
            f"in one process. target_ms = 1.2 x single-process time ({a.threads} thread(s)) / {a.world} + "
            f"collectives_ms (the same collectives alone); cpu_ms: CPU time of the process during the call (all its "
            f"threads), cpu_vs_half_single: the slowest rank's against half the single-process CPU time, the measure "
            f"of work that waits for other jobs do not inflate; max_abs_diff_vs_single: loss or log-probs and both "
            f"gradients against the single-process op. 1-minute load average {load:.1f} before, {load_end:.1f} "
            f"after (a shared machine: other jobs ran at the same time).")
    out_dir = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    from .harness import write_results

    torch.set_num_threads(a.threads)  # the environment line reports the per-process threads
    name = "vocab_parallel" + (f"_{a.tag}" if a.tag else "")
    write_results(name, a.device, rows, out_dir, note)
    print(markdown_table(rows))
    print(f"\n{note}\nwritten under {out_dir}")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
