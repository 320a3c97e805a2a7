"""Compiles the Triton kernels for sm_80 and sm_90 without a GPU; run by test_triton_compile.py.

Run as a script in a process without TRITON_INTERPRET (under the interpreter, @triton.jit
makes functions that cannot be compiled). Prints one line per compiled kernel and exits
non-zero on the first failure.
"""

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from steppo_fast.kernels import logprob, step_rewards

LOGPROB_FWD = {"logits_ptr": "*{dt}", "labels_ptr": "*i64", "mask_ptr": "*u8", "logp_ptr": "*fp32",
               "ent_ptr": "*fp32", "lse_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "rows_per_batch": "i32",
               "stride_b": "i64", "stride_t": "i64", "inv_tau": "fp32"}
LOGPROB_BWD = dict(LOGPROB_FWD, glogp_ptr="*fp32", gent_ptr="*fp32", grad_ptr="*{gdt}", gstride_b="i64",
                   gstride_t="i64")


def compile_one(fn, signature, constexprs, arch, num_warps=8):
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                         target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert out.asm["ptx"] and out.asm["cubin"], "no PTX or cubin"
    print(f"ok {fn.__name__} sm_{arch} {constexprs}")


def main():
    for arch in (80, 90):
        for dt in ("bf16", "fp32"):
            bf16 = dt == "bf16"
            fwd = {k: v.format(dt=dt) for k, v in LOGPROB_FWD.items()}
            compile_one(logprob._token_logprobs_fwd_kernel, fwd,
                        {"BLOCK_V": 4096, "WITH_ENTROPY": True, "ACC": tl.float32}, arch)
            bwd = {k: v.format(dt=dt, gdt="i16" if bf16 else dt) for k, v in LOGPROB_BWD.items()}
            compile_one(logprob._token_logprobs_bwd_kernel, bwd,
                        {"BLOCK_V": 4096, "WITH_ENTROPY": True, "ACC": tl.float32, "BF16_BITS": bf16}, arch)
        sig = {"rewards_ptr": "*fp32", "step_tokens_ptr": "*i64", "offsets_ptr": "*i64", "out_ptr": "*fp32",
               "num_steps": "i32"}
        compile_one(step_rewards._step_rewards_kernel, sig, {"BLOCK": 128, "ACC64": False}, arch, num_warps=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
