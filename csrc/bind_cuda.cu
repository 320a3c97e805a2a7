// pybind11 module steppo_fast._C_cuda: the CUDA kernels. It links the CUDA
// runtime statically, so it imports without a GPU; every entry point checks for a
// usable device first and raises RuntimeError when there is none.
#include <pybind11/pybind11.h>

#include "credit_cuda.h"
#include "cuda_check.cuh"
#include "step_rewards_cuda.h"

namespace py = pybind11;

static int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

static int runtime_version() {
  int v = 0;
  STEPPO_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "steppo_fast CUDA kernels";
  m.def("device_count", &device_count, "Number of usable CUDA devices (0 without a GPU or driver).");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the module was linked with.");
  m.def("step_rewards_cuda", &steppo::step_rewards_cuda, py::arg("rewards"), py::arg("rewards_dtype"),
        py::arg("n_rewards"), py::arg("step_tokens"), py::arg("n_step_tokens"), py::arg("step_token_offsets"),
        py::arg("num_steps"), py::arg("out"), py::arg("out_dtype"), py::arg("err"), py::arg("stream"),
        py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Per-step sum of token rewards over a CSR token list (SPEC section 3); bad entries lower err.");

  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("broadcast_to_tokens_cuda", &steppo::broadcast_to_tokens_cuda, arg("step_values"), arg("values_dtype"),
        arg("num_values"), arg("token_step"), arg("n"), arg("out"), arg("out_dtype"), arg("err"), arg("stream"),
        arg("device"), nogil, "out[t] = step_values[token_step[t]] (0 where token_step is -1).");
  m.def("step_gae_cuda", &steppo::step_gae_cuda, arg("rewards"), arg("rewards_dtype"), arg("values"),
        arg("values_dtype"), arg("num_steps"), arg("traj_step_offsets"), arg("num_trajectories"), arg("gamma"),
        arg("lam"), arg("adv"), arg("ret"), arg("out_dtype"), arg("err"), arg("stream"), arg("device"), nogil,
        "Step-level GAE, one warp per trajectory.");
  m.def("token_gae_cuda", &steppo::token_gae_cuda, arg("rewards"), arg("rewards_dtype"), arg("values"),
        arg("values_dtype"), arg("n_tokens"), arg("step_tokens"), arg("n_step_tokens"), arg("step_token_offsets"),
        arg("num_steps"), arg("traj_step_offsets"), arg("num_trajectories"), arg("gamma"), arg("lam"), arg("adv"),
        arg("ret"), arg("out_dtype"), arg("err"), arg("stream"), arg("device"), nogil,
        "Token-level GAE across steps, one warp per trajectory.");
  m.def("whiten_moments_cuda_workspace", &steppo::whiten_moments_cuda_workspace, arg("n"),
        "Doubles of device workspace whiten_moments_cuda needs.");
  m.def("whiten_moments_cuda", &steppo::whiten_moments_cuda, arg("x"), arg("x_dtype"), arg("mask"), arg("n"),
        arg("out"), arg("workspace"), arg("stream"), arg("device"), nogil,
        "(count, sum, sum of squares) in float64, in a fixed order.");
  m.def("whiten_apply_cuda", &steppo::whiten_apply_cuda, arg("x"), arg("x_dtype"), arg("mask"), arg("n"),
        arg("moments"), arg("mode"), arg("eps"), arg("out"), arg("out_dtype"), arg("stream"), arg("device"), nogil,
        "Whitening with device-resident moments.");
  m.def("group_advantage_cuda_workspace", &steppo::group_advantage_cuda_workspace, arg("n"), arg("device"),
        "Bytes of device workspace group_advantage_cuda needs.");
  m.def("group_advantage_cuda", &steppo::group_advantage_cuda, arg("values"), arg("values_dtype"), arg("group"),
        arg("subkey"), arg("n"), arg("norm"), arg("singleton"), arg("eps"), arg("out"), arg("out_dtype"),
        arg("workspace"), arg("workspace_bytes"), arg("stream"), arg("device"), nogil,
        "Group normalisation over groups of equal (group, subkey).");
}
