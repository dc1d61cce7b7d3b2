// Python bindings of the vocab_head domain: the fused vocabulary head of one denoising step.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops/registry.h"
#ifdef DGEMMA_WITH_CUDA
#include "ops/vocab_head.h"
#endif

namespace py = pybind11;

namespace dgemma {

#ifdef DGEMMA_WITH_CUDA

namespace {

void bind_step(py::handle hidden, py::handle embed, py::handle prev_argmax, py::handle finished_in,
               py::handle max_logit, py::handle lse, py::handle entropy, py::handle argmax, py::handle sample,
               py::handle accepted, py::handle next_canvas, py::handle mean_entropy, py::handle stable,
               py::handle finished_out,
               py::handle soft, py::handle workspace, double temperature, double softcap, double entropy_bound,
               double confidence, double soft_scale, uint64_t seed, uint32_t step, std::uintptr_t stream,
               py::handle device_seed_step, py::handle device_temperature, int64_t impl, py::handle embed_fp8,
               py::handle embed_fp8_scale) {
  VocabHeadArgs a;
  a.hidden = to_arg(hidden, "hidden");
  a.embed = to_arg(embed, "embed");
  a.prev_argmax = to_arg(prev_argmax, "prev_argmax");
  TensorArg finished_arg, soft_arg;
  a.finished_in = optional_arg(finished_in, "finished", finished_arg);
  a.max_logit = to_arg(max_logit, "max_logit");
  a.lse = to_arg(lse, "lse");
  a.entropy = to_arg(entropy, "entropy");
  a.argmax = to_arg(argmax, "argmax");
  a.sample = to_arg(sample, "sample");
  a.accepted = to_arg(accepted, "accepted");
  a.next_canvas = to_arg(next_canvas, "next_canvas");
  a.mean_entropy = to_arg(mean_entropy, "mean_entropy");
  a.stable = to_arg(stable, "stable");
  a.finished_out = to_arg(finished_out, "finished_out");
  a.soft = optional_arg(soft, "soft", soft_arg);
  a.workspace = to_arg(workspace, "workspace");
  TensorArg seed_step_arg, temperature_arg;
  a.device_seed_step = optional_arg(device_seed_step, "device_seed_step", seed_step_arg);
  a.device_temperature = optional_arg(device_temperature, "device_temperature", temperature_arg);
  TensorArg embed_fp8_arg, embed_fp8_scale_arg;
  a.embed_fp8 = optional_arg(embed_fp8, "embed_fp8", embed_fp8_arg);
  a.embed_fp8_scale = optional_arg(embed_fp8_scale, "embed_fp8_scale", embed_fp8_scale_arg);
  VocabHeadScalars s;
  s.temperature = temperature;
  s.softcap = softcap;
  s.entropy_bound = entropy_bound;
  s.confidence = confidence;
  s.soft_scale = soft_scale;
  s.seed = seed;
  s.step = step;
  s.impl = impl;
  vocab_head_step(a, s, stream);
}

}  // namespace

#else

namespace {

void bind_step(py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
               py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, double,
               double, double, double, double, uint64_t, uint32_t, std::uintptr_t, py::handle, py::handle, int64_t,
               py::handle, py::handle) {
  cuda_unavailable("vocab_head_step");
}

int64_t vocab_head_workspace_bytes(int64_t, int64_t, int64_t, int64_t, bool, int, int64_t, bool) {
  cuda_unavailable("vocab_head_workspace_bytes");
}

std::string vocab_head_unsupported(int64_t, int64_t, int64_t, int64_t) { cuda_unavailable("vocab_head_unsupported"); }

}  // namespace

#endif

void register_vocab_head(py::module_& m) {
  m.def("vocab_head_unsupported", &vocab_head_unsupported, py::arg("batch"), py::arg("canvas"), py::arg("vocab"),
        py::arg("hidden"), "Why the fused vocabulary head cannot run these sizes, or '' when it can.");
  m.def("vocab_head_workspace_bytes", &vocab_head_workspace_bytes, py::arg("batch"), py::arg("canvas"),
        py::arg("vocab"), py::arg("hidden"), py::arg("with_soft"), py::arg("device"), py::arg("impl") = 0,
        py::arg("fp8_soft") = false,
        "Bytes of uint8 workspace one vocab_head_step call of implementation impl needs on a device (fp8_soft: a "
        "call given embed_fp8).");
  m.def("vocab_head_step", &bind_step, py::arg("hidden"), py::arg("embed"), py::arg("prev_argmax"),
        py::arg("finished"), py::arg("max_logit"), py::arg("lse"), py::arg("entropy"), py::arg("argmax"),
        py::arg("sample"), py::arg("accepted"), py::arg("next_canvas"), py::arg("mean_entropy"), py::arg("stable"),
        py::arg("finished_out"), py::arg("soft"), py::arg("workspace"), py::arg("temperature"), py::arg("softcap"),
        py::arg("entropy_bound"), py::arg("confidence"), py::arg("soft_scale"), py::arg("seed"), py::arg("step"),
        py::arg("stream"), py::arg("device_seed_step") = py::none(), py::arg("device_temperature") = py::none(),
        py::arg("impl") = 0, py::arg("embed_fp8") = py::none(), py::arg("embed_fp8_scale") = py::none(),
        "Fused vocabulary head of one denoising step (statistics, sample, acceptance, self-conditioning input). "
        "device_seed_step (int64 [2]: seed, step) and device_temperature (fp32 [1]), when given, are read on the "
        "device in place of seed, step and temperature (for CUDA-graph replay). impl: the GEMMs, 0 mma.sync, "
        "1 CUTLASS sm90 wgmma (the workspace must be sized for the same impl). embed_fp8 (e4m3 [hidden, vocab_pad]) "
        "and embed_fp8_scale (fp32 [hidden]): the self-conditioning product in FP8 (impl 1; workspace sized with "
        "fp8_soft).");
}

}  // namespace dgemma
