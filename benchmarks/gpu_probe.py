"""The headline numbers of a CUDA device in about a minute, one guarded section each.

* ``copy``: device-to-device copy bandwidth (bytes read + written), the ceiling of the
  memory-bound ops.
* ``logprob``: ``token_logprobs`` in bf16 at N = 16384, V = 151936 (N x V > 2^31): forward,
  backward kernel, and forward + backward through autograd, in GB/s of the fewest bytes each
  must move (N V, 2 N V and 3 N V logits) and as a share of the copy bandwidth; the last rows,
  past 2^31 elements, checked against torch in float32.
* ``syncs``: host synchronisations per call of each loss and advantage path, counted under
  ``torch.cuda.set_sync_debug_mode("warn")`` on a call after a warm-up (each should be 0).
* ``fused_loss``: ``linear_steppo_loss`` forward + backward (gradients of hidden and weight) at
  N = 16384, H = 4096, V = 151936 in bf16, every token an agent token, in TFLOP/s counted as
  6 N H V, next to one bf16 N x H x V product; peak memory beyond the inputs, and beyond the
  gradients it must return.

Each section's failure is recorded and the next one runs. Results: ``probe.json`` and
``probe.md`` under ``--out``. ``--tiny`` runs small sizes; with ``--device cpu`` (and
``TRITON_INTERPRET=1`` for the Triton kernels) it checks that the probe still runs against the
current API.

    python3 -m steppo_fast.benchmarks.gpu_probe --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List

import torch

import steppo_fast as sf
from steppo_fast import ops

from .bench_linear_head import make_batch
from .harness import environment, peak_memory_bytes, time_median_ms

FULL = {"copy_elems": 16384 * 151936, "lp_n": 16384, "lp_v": 151936, "fl_n": 16384, "fl_h": 4096, "fl_v": 151936,
        "fl_t": 256, "sync_n": 2048, "sync_v": 32000, "sync_h": 1024}
TINY = {"copy_elems": 1 << 16, "lp_n": 64, "lp_v": 1000, "fl_n": 64, "fl_h": 32, "fl_v": 500, "fl_t": 16,
        "sync_n": 64, "sync_v": 500, "sync_h": 32}


class Probe:
    def __init__(self, device: str, sizes: Dict[str, int], backend: str, one_call_timing: bool = False):
        self.device, self.sizes, self.backend = device, sizes, backend
        self.one_call_timing = one_call_timing  # a smoke run: time one call, no repeats
        self.results: Dict[str, Dict[str, Any]] = {}
        self.lines: List[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def section(self, name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # one section's failure never hides the others
            res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            self.say(f"{name}: FAILED {res['error']}")
            traceback.print_exc()
        res["seconds"] = round(time.perf_counter() - t0, 2)
        self.results[name] = res
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def ms(self, fn: Callable[[], Any]) -> float:
        if self.one_call_timing:
            t0 = time.perf_counter()
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3
        return time_median_ms(fn, self.device, 0.1)

    def peak(self, fn: Callable[[], Any]) -> float:
        """Peak bytes allocated by one call beyond what was live before it (CUDA; 0 on the CPU)."""
        if self.device != "cuda":
            fn()
            return 0.0
        return float(peak_memory_bytes(fn, "cuda"))

    # ------------------------------------------------------------------ sections
    def copy(self) -> Dict[str, Any]:
        n = self.sizes["copy_elems"]
        x = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        y = torch.empty_like(x)
        ms = self.ms(lambda: y.copy_(x))
        moved = 2 * x.numel() * x.element_size()
        gbs = moved / ms / 1e6
        self.copy_gbs = gbs
        self.say(f"copy: {gbs:.0f} GB/s read + write ({x.numel() * 2 / 1e9:.2f} GB bf16, {ms:.3f} ms)")
        return {"GB/s": gbs, "ms": ms, "bytes": moved}

    def logprob(self) -> Dict[str, Any]:
        n, v = self.sizes["lp_n"], self.sizes["lp_v"]
        dev, b = self.device, self.backend
        g = torch.Generator(device=dev).manual_seed(0)
        z = torch.randn(n, v, generator=g, device=dev, dtype=torch.bfloat16).mul_(2)
        y = torch.randint(0, v, (n,), generator=g, device=dev)
        m = torch.ones(n, dtype=torch.bool, device=dev)
        nbytes = z.numel() * z.element_size()
        op_f = torch.ops.steppo_fast.token_logprobs
        op_b = torch.ops.steppo_fast.token_logprobs_backward
        out: Dict[str, Any] = {"N": n, "V": v, "dtype": "bfloat16", "backend": ops.resolve_backend(
            "token_logprobs", torch.device(dev), b), "N*V>2^31": n * v > 2 ** 31}
        with torch.no_grad():
            lp, ent, lse = op_f(z, y, m, 1.0, True, False, b)
            ones = torch.ones_like(lp)
            runs = {"fwd": (lambda: op_f(z, y, m, 1.0, True, False, b), nbytes),
                    "bwd kernel": (lambda: op_b(z, y, m, lp, ent, lse, ones, ones, 1.0, True, b), 2 * nbytes)}
            for name, (fn, moved) in runs.items():
                ms = self.ms(fn)
                out[name] = self._rate(name, ms, moved)

        def fwd_bwd():
            zz = z.detach().requires_grad_(True)
            a, e = sf.token_logprobs(zz, y, m, validate=False, backend=b)
            (gz,) = torch.autograd.grad(a.sum() + e.sum(), [zz])
            return a, e, gz

        ms = self.ms(fwd_bwd)
        out["fwd+bwd"] = self._rate("fwd+bwd", ms, 3 * nbytes)
        out["fwd+bwd"]["extra_MiB"] = (self.peak(fwd_bwd) - nbytes) / 2 ** 20
        # The last rows lie past 2^31 elements at the full size: check them against torch.
        a, e, gz = fwd_bwd()
        k = min(4, n)
        zl = z[-k:].float().requires_grad_(True)
        logp_all = torch.log_softmax(zl, -1)
        la = logp_all.gather(-1, y[-k:, None]).squeeze(-1)
        le = -(logp_all.exp() * logp_all).sum(-1)
        (gl,) = torch.autograd.grad(la.sum() + le.sum(), [zl])
        out["last_rows_err"] = {"logp": (a[-k:] - la).abs().max().item(), "entropy": (e[-k:] - le).abs().max().item(),
                                "grad": (gz[-k:].float() - gl).abs().max().item()}
        self.say(f"logprob last {k} rows vs torch fp32: max err logp {out['last_rows_err']['logp']:.2e}, "
                 f"entropy {out['last_rows_err']['entropy']:.2e}, grad {out['last_rows_err']['grad']:.2e} (bf16)")
        return out

    def _rate(self, name: str, ms: float, moved: float) -> Dict[str, Any]:
        gbs = moved / ms / 1e6
        share = gbs / self.copy_gbs if getattr(self, "copy_gbs", None) else None
        self.say(f"token_logprobs {name}: {ms:.3f} ms, {gbs:.0f} GB/s"
                 + (f", {100 * share:.0f}% of copy" if share else ""))
        return {"ms": ms, "GB/s": gbs, "share_of_copy": share}

    def syncs(self) -> Dict[str, Any]:
        dev, b = self.device, self.backend
        n, v, hdim = self.sizes["sync_n"], self.sizes["sync_v"], self.sizes["sync_h"]
        T = 16
        B = n // T
        g = torch.Generator(device=dev).manual_seed(1)
        mask = torch.rand(B, T, generator=g, device=dev) > 0.2
        mask[:, 0] = True
        rows = torch.arange(B, device=dev)
        lay = sf.StepLayout.from_step_rows(mask, rows // 2, rows % 2, rows // 8)
        z = torch.randn(B, T, v, generator=g, device=dev)
        y = torch.randint(0, v, (B, T), generator=g, device=dev)
        old = torch.randn(B, T, generator=g, device=dev) * 0.1 - 8
        adv = torch.randn(B, T, generator=g, device=dev)
        h = torch.randn(B, T, hdim, generator=g, device=dev)
        w = torch.randn(v, hdim, generator=g, device=dev) / hdim ** 0.5
        rew = torch.randn(B, T, generator=g, device=dev) * mask
        vals = torch.randn(B, T, generator=g, device=dev)
        anchors = torch.arange(lay.num_steps, device=dev) % 3
        loss_mod = sf.StepPOLoss(validate=False, backend=b)

        def grad_of(loss, *xs):
            return torch.autograd.grad(loss, list(xs))

        def lp_fn():
            zz = z.detach().requires_grad_(True)
            a, e = sf.token_logprobs(zz, y, lay, validate=False, backend=b)
            return grad_of(a.sum() + e.sum(), zz)

        def pl_fn():
            x = (old + 0.05).requires_grad_(True)
            return grad_of(sf.policy_loss(x, old, adv, lay, backend=b)[0], x)

        def logits_loss_fn():
            zz = z.detach().requires_grad_(True)
            return grad_of(loss_mod(zz, y, lay, old, adv)[0], zz)

        def hidden_loss_fn():
            hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
            return grad_of(loss_mod(hh, y, lay, old, adv, weight=ww)[0], hh, ww)

        paths = {"token_logprobs fwd+bwd": lp_fn, "policy_loss fwd+bwd": pl_fn,
                 "StepPOLoss from logits fwd+bwd": logits_loss_fn, "StepPOLoss from hidden fwd+bwd": hidden_loss_fn}
        for est in sf.advantages.ESTIMATORS:
            paths[f"compute_advantages({est})"] = (
                lambda est=est: sf.compute_advantages(est, lay, token_rewards=rew, values=vals, anchor_keys=anchors,
                                                      gamma=0.99, lam=0.95).token_advantages)
        out: Dict[str, Any] = {}
        for name, fn in paths.items():
            try:
                fn()  # warm-up: compilation and caches
                out[name] = self._count_syncs(fn)
            except Exception as exc:
                out[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self.say(f"syncs per call, {name}: {out[name]}")
        return out

    def _count_syncs(self, fn: Callable[[], Any]):
        if self.device != "cuda":
            fn()
            return "n/a (cpu)"
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum(1 for w in caught if "synchroniz" in str(w.message).lower())

    def fused_loss(self) -> Dict[str, Any]:
        n, hdim, v, T = (self.sizes[k] for k in ("fl_n", "fl_h", "fl_v", "fl_t"))
        dt = torch.bfloat16 if self.device == "cuda" else torch.float32
        s = make_batch(n, hdim, v, dt, self.device, 1.0, T)
        flops = 6.0 * n * hdim * v
        h2 = s["h"].reshape(-1, hdim)
        prod_ms = self.ms(lambda: torch.mm(h2, s["w"].t()))
        prod_tf = 2.0 * n * hdim * v / prod_ms / 1e9
        self.say(f"one {str(dt).replace('torch.', '')} product {n} x {hdim} x {v}: {prod_ms:.3f} ms, "
                 f"{prod_tf:.0f} TFLOP/s")

        def run():
            h, w = s["h"].detach().requires_grad_(True), s["w"].detach().requires_grad_(True)
            loss, _ = sf.linear_steppo_loss(h, w, s["y"], s["layout"], s["old"], s["adv"], validate=False,
                                            backend=self.backend)
            return (loss,) + torch.autograd.grad(loss, [h, w])

        ms = self.ms(run)
        tf = flops / ms / 1e9
        grads = (n * hdim + v * hdim) * s["h"].element_size()
        peak = self.peak(run)
        out = {"N": n, "H": hdim, "V": v, "dtype": str(dt).replace("torch.", ""), "ms": ms, "TFLOP/s (6NHV)": tf,
               "product_ms": prod_ms, "product_TFLOP/s": prod_tf, "share_of_3_products": 3 * prod_ms / ms,
               "peak_MiB": peak / 2 ** 20, "extra_MiB": (peak - grads) / 2 ** 20}
        self.say(f"fused loss fwd+bwd N={n} H={hdim} V={v}: {ms:.2f} ms, {tf:.0f} TFLOP/s (6NHV), "
                 f"{100 * out['share_of_3_products']:.0f}% of three products' rate; peak {peak / 2 ** 20:.0f} MiB, "
                 f"{out['extra_MiB']:.0f} MiB beyond the gradients")
        return out


def _markdown(probe: Probe, env: Dict[str, str]) -> str:
    head = " · ".join(f"{k}: {v}" for k, v in env.items())
    body = "\n".join(f"- {line}" for line in probe.lines)
    return f"# device probe\n\n{head}\n\n{body}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for probe.json and probe.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small sizes, one timed call each (a smoke run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_probe: no CUDA device; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # On the CPU the Triton kernels run under the interpreter when it is on, else the defaults.
    backend = "triton" if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" else "auto"
    probe = Probe(args.device, TINY if args.tiny else FULL, backend, one_call_timing=args.tiny)
    env = environment(args.device)
    probe.say(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, backend {backend}")
    for name in ("copy", "logprob", "syncs", "fused_loss"):
        probe.section(name, getattr(probe, name))
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"environment": env, "sizes": probe.sizes, "results": probe.results}, f, indent=1, default=str)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write(_markdown(probe, env))
    failed = [k for k, r in probe.results.items() if "error" in r]
    if failed:
        print(f"gpu_probe: sections failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
