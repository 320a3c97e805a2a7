// pybind11 module steppo_fast._C: the C++ CPU kernels. Arguments are raw data
// pointers (as integers), sizes and dtype codes; the registry (steppo_fast/ops) checks
// every tensor's dtype, device and size before it calls in, and the kernels check every
// index and offset they read against those sizes (a bad one raises ValueError).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "credit.h"
#include "logprob.h"
#include "policy_loss.h"
#include "step_rewards.h"

namespace py = pybind11;

static int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "steppo_fast C++ CPU kernels";
  m.def("max_threads", &max_threads, "Threads the OpenMP loops may use (1 without OpenMP).");
  m.def("step_rewards_cpu", &steppo::step_rewards_cpu, py::arg("rewards"), py::arg("rewards_dtype"),
        py::arg("n_rewards"), py::arg("step_tokens"), py::arg("n_step_tokens"), py::arg("step_token_offsets"),
        py::arg("num_steps"), py::arg("out"),
        py::arg("out_dtype"), py::call_guard<py::gil_scoped_release>(),
        "Per-step sum of token rewards over a CSR token list (SPEC section 3).");
  m.def("broadcast_to_tokens_cpu", &steppo::broadcast_to_tokens_cpu, py::arg("step_values"),
        py::arg("values_dtype"), py::arg("num_values"), py::arg("token_step"), py::arg("n"), py::arg("out"),
        py::arg("out_dtype"), py::call_guard<py::gil_scoped_release>(),
        "out[t] = step_values[token_step[t]], 0 off-step (SPEC 4).");
  m.def("step_gae_cpu", &steppo::step_gae_cpu, py::arg("rewards"), py::arg("rewards_dtype"), py::arg("values"),
        py::arg("values_dtype"), py::arg("num_steps"), py::arg("traj_step_offsets"), py::arg("num_trajectories"),
        py::arg("gamma"), py::arg("lam"), py::arg("adv"), py::arg("ret"), py::arg("out_dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "Step-level GAE per trajectory (SPEC 4).");
  m.def("token_gae_cpu", &steppo::token_gae_cpu, py::arg("rewards"), py::arg("rewards_dtype"), py::arg("values"),
        py::arg("values_dtype"), py::arg("n_tokens"), py::arg("step_tokens"), py::arg("n_step_tokens"),
        py::arg("step_token_offsets"), py::arg("num_steps"), py::arg("traj_step_offsets"),
        py::arg("num_trajectories"), py::arg("gamma"), py::arg("lam"), py::arg("adv"), py::arg("ret"),
        py::arg("out_dtype"), py::call_guard<py::gil_scoped_release>(),
        "Token-level GAE across the steps of each trajectory (SPEC 5).");
  m.def("whiten_moments_cpu", &steppo::whiten_moments_cpu, py::arg("x"), py::arg("x_dtype"), py::arg("mask"),
        py::arg("n"), py::arg("out"), py::call_guard<py::gil_scoped_release>(),
        "(count, sum, sum of squares) in float64, in a fixed order (SPEC 4, 5).");
  m.def("whiten_apply_cpu", &steppo::whiten_apply_cpu, py::arg("x"), py::arg("x_dtype"), py::arg("mask"),
        py::arg("n"), py::arg("moments"), py::arg("mode"), py::arg("eps"), py::arg("out"), py::arg("out_dtype"),
        py::call_guard<py::gil_scoped_release>(), "Whitening with given moments (SPEC 4, 5).");
  m.def("group_advantage_cpu", &steppo::group_advantage_cpu, py::arg("values"), py::arg("values_dtype"),
        py::arg("group"), py::arg("subkey"), py::arg("n"), py::arg("norm"), py::arg("singleton"), py::arg("eps"),
        py::arg("out"), py::arg("out_dtype"), py::call_guard<py::gil_scoped_release>(),
        "Normalisation within groups of equal (group, subkey): GRPO, RLOO, GiGPO (SPEC 6).");
  m.def("token_logprobs_cpu", &steppo::token_logprobs_cpu, py::arg("logits"), py::arg("logits_dtype"), py::arg("n"),
        py::arg("vocab"), py::arg("rows_per_batch"), py::arg("stride_b"), py::arg("stride_t"), py::arg("labels"),
        py::arg("labels_dtype"), py::arg("mask"), py::arg("temperature"), py::arg("with_entropy"), py::arg("logp"),
        py::arg("entropy"), py::arg("lse"), py::call_guard<py::gil_scoped_release>(),
        "Per-row log-prob of the label, entropy and log-sum-exp in one pass over each masked-in row (SPEC 2).");
  m.def("token_logprobs_backward_cpu", &steppo::token_logprobs_backward_cpu, py::arg("logits"),
        py::arg("logits_dtype"), py::arg("n"), py::arg("vocab"), py::arg("rows_per_batch"), py::arg("stride_b"),
        py::arg("stride_t"), py::arg("labels"), py::arg("labels_dtype"), py::arg("mask"), py::arg("logp"),
        py::arg("entropy"), py::arg("lse"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("temperature"),
        py::arg("with_entropy"), py::arg("grad"), py::arg("grad_stride_b"), py::arg("grad_stride_t"),
        py::call_guard<py::gil_scoped_release>(),
        "dL/dlogits in the logits dtype in one pass over each row, optionally into the logits buffer (SPEC 2).");
  m.def("policy_loss_cpu", &steppo::policy_loss_cpu, py::arg("logp"), py::arg("old_logp"), py::arg("advantages"),
        py::arg("float_dtype"), py::arg("token_step"), py::arg("step_dtype"), py::arg("n"), py::arg("num_steps"),
        py::arg("weights"), py::arg("entropy"), py::arg("ref_logp"), py::arg("ratio_level"), py::arg("clip_low"),
        py::arg("clip_high"), py::arg("dual_clip"), py::arg("agg_mode"), py::arg("entropy_coef"), py::arg("kl_coef"),
        py::arg("kl_type"), py::arg("global_num_tokens"), py::arg("global_num_steps"), py::arg("norm_constant"),
        py::arg("loss"), py::arg("metrics"), py::arg("grad_logp"), py::arg("grad_entropy"),
        py::call_guard<py::gil_scoped_release>(),
        "The clipped policy loss, its metrics and its closed-form gradients in two passes (SPEC 7).");
}
