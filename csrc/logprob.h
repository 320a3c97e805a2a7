#pragma once
#include <cstdint>

#include "common.h"

namespace steppo {

// Token log-probs and entropy (SPEC section 2) on the CPU.
//
// Row r of the logits lives at logits + (r / rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t
// (elements), with the V entries of a row contiguous: this covers (N, V) and (B, T, V) tensors whose rows
// are strided, such as logits[:, :-1]. labels (N,) int32/int64 and mask (N,) bool are contiguous.
// Outputs logp, entropy: (N,) float32 (float64 for float64 logits); lse: (N,) float64 (the log-sum-exp is
// shift + log(sum), kept exactly so that the backward's log p = u - lse does not inherit a float rounding of
// lse). All three are 0 on masked-out rows.
// A masked-in label outside [0, V) gives NaN in that row; nothing outside the row is read.
void token_logprobs_cpu(uintptr_t logits, int logits_dtype, int64_t n, int64_t vocab, int64_t rows_per_batch,
                        int64_t stride_b, int64_t stride_t, uintptr_t labels, int labels_dtype, uintptr_t mask,
                        double temperature, bool with_entropy, uintptr_t logp, uintptr_t entropy, uintptr_t lse);

// dL/dz (SPEC section 2) from the forward's per-row logp, entropy and lse and the upstream
// gradients (N,) of the forward's output dtype. Written in the logits dtype to `grad`, whose rows
// use the same (rows_per_batch, grad_stride_b, grad_stride_t) addressing; grad may be the logits
// buffer itself (in-place backward). Masked-out rows are written as 0.
void token_logprobs_backward_cpu(uintptr_t logits, int logits_dtype, int64_t n, int64_t vocab,
                                 int64_t rows_per_batch, int64_t stride_b, int64_t stride_t, uintptr_t labels,
                                 int labels_dtype, uintptr_t mask, uintptr_t logp, uintptr_t entropy, uintptr_t lse,
                                 uintptr_t grad_logp, uintptr_t grad_entropy, double temperature, bool with_entropy,
                                 uintptr_t grad, int64_t grad_stride_b, int64_t grad_stride_t);

}  // namespace steppo
