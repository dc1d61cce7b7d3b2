#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/vocab_head.cuh"
#include "ops/vocab_head.h"

namespace dgemma {
namespace {

namespace vh = kernels::vocab_head;

void throw_if_failed(cudaError_t err, const char* what) {
  if (err != cudaSuccess) ::dgemma::throw_runtime(std::string(what) + " failed: " + cudaGetErrorString(err));
}

int multiprocessors(int device) {
  int sms = 0;
  throw_if_failed(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

void check_tensor(const TensorArg& t, const TensorArg& ref, DType dtype, std::initializer_list<int64_t> shape) {
  check_cuda(t);
  check_same_device(ref, t);
  check_dtype(t, dtype);
  check_ndim(t, shape.size());
  size_t d = 0;
  for (int64_t s : shape) {
    check_dim(t, d, s, "see the documented shape");
    ++d;
  }
  check_contiguous(t);
}

void check_aligned(const TensorArg& t, size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(t.data) % bytes != 0)
    ::dgemma::throw_invalid(t.name + " must be " + std::to_string(bytes) +
                                "-byte aligned (a view at an odd offset? call .clone())");
}

void check_finite(double v, const char* name, bool positive) {
  if (!std::isfinite(v) || (positive && !(v > 0)))
    ::dgemma::throw_invalid(std::string(name) + " must be a " + (positive ? "positive " : "") +
                                "finite number, got " + std::to_string(v));
}

}  // namespace

std::string vocab_head_unsupported(int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden) {
  if (batch < 1 || batch > (1 << 28)) return "batch " + std::to_string(batch) + " must be in [1, 268435456]";
  if (canvas < 1 || canvas > vh::kMaxCanvas)
    return "canvas length " + std::to_string(canvas) + " must be in [1, " + std::to_string(vh::kMaxCanvas) +
           "] (one CTA ranks a sequence's positions)";
  if (vocab < 1 || vocab > (1 << 30)) return "vocab size " + std::to_string(vocab) + " must be in [1, 1073741824]";
  if (hidden < vh::kBK || hidden % vh::kBK != 0 || hidden > (1 << 16))
    return "hidden size " + std::to_string(hidden) + " must be a positive multiple of " + std::to_string(vh::kBK) +
           " up to 65536";
  return "";
}

namespace {

void check_problem(int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden) {
  const std::string why = vocab_head_unsupported(batch, canvas, vocab, hidden);
  if (!why.empty()) ::dgemma::throw_invalid(why);
}

vh::VocabHeadPlan plan_for(int impl, int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden, bool with_soft,
                           int sms, bool fp8_soft) {
  return vh::plan_head(impl, static_cast<int>(batch), static_cast<int>(canvas), static_cast<int>(vocab),
                       static_cast<int>(hidden), sms, with_soft, fp8_soft);
}

// Why a call cannot take the FP8 self-conditioning operand, or "" when it can.
std::string fp8_soft_refused(int64_t impl, int64_t vocab, bool with_soft) {
  if (!with_soft) return "needs the self-conditioning pass (soft)";
  if (impl != vh::kImplWgmma) return "runs only on impl 1 (wgmma), got impl " + std::to_string(impl);
  if (!vh::sm90_soft_fits(static_cast<int>(vocab)))
    return "needs a vocabulary that is a multiple of 8, got " + std::to_string(vocab);
  return "";
}

void check_impl(int64_t impl) {
  if (impl < 0 || impl >= vh::kImplCount)
    ::dgemma::throw_invalid("impl " + std::to_string(impl) + " must be 0 (mma.sync) or 1 (wgmma)");
}

}  // namespace

int64_t vocab_head_workspace_bytes(int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden, bool with_soft,
                                   int device, int64_t impl, bool fp8_soft) {
  check_problem(batch, canvas, vocab, hidden);
  check_impl(impl);
  if (fp8_soft) {
    const std::string why = fp8_soft_refused(impl, vocab, with_soft);
    if (!why.empty()) ::dgemma::throw_invalid("the FP8 self-conditioning pass " + why);
  }
  const int sms = multiprocessors(device);
  return static_cast<int64_t>(plan_for(static_cast<int>(impl), batch, canvas, vocab, hidden, with_soft, sms, fp8_soft)
                                  .layout.total);
}

void vocab_head_step(const VocabHeadArgs& a, const VocabHeadScalars& s, std::uintptr_t stream) {
  const TensorArg& h = a.hidden;
  check_cuda(h);
  check_dtype(h, DType::kBFloat16);
  check_ndim(h, 3);
  check_contiguous(h);
  const int64_t batch = h.shape[0], canvas = h.shape[1], hidden = h.shape[2];
  check_tensor(a.embed, h, DType::kBFloat16, {a.embed.shape.empty() ? 0 : a.embed.shape[0], hidden});
  const int64_t vocab = a.embed.shape[0];
  check_problem(batch, canvas, vocab, hidden);
  check_aligned(h, 16);
  check_aligned(a.embed, 16);
  check_tensor(a.prev_argmax, h, DType::kInt64, {batch, canvas});
  if (a.finished_in != nullptr) check_tensor(*a.finished_in, h, DType::kBool, {batch});
  for (const TensorArg* t : {&a.max_logit, &a.lse, &a.entropy}) check_tensor(*t, h, DType::kFloat32, {batch, canvas});
  for (const TensorArg* t : {&a.argmax, &a.sample, &a.next_canvas}) check_tensor(*t, h, DType::kInt64, {batch, canvas});
  check_tensor(a.accepted, h, DType::kBool, {batch, canvas});
  check_tensor(a.mean_entropy, h, DType::kFloat32, {batch});
  check_tensor(a.stable, h, DType::kBool, {batch});
  check_tensor(a.finished_out, h, DType::kBool, {batch});
  if (a.soft != nullptr) {
    check_tensor(*a.soft, h, DType::kBFloat16, {batch, canvas, hidden});
    check_aligned(*a.soft, 16);
  }
  if (a.device_seed_step != nullptr) check_tensor(*a.device_seed_step, h, DType::kInt64, {2});
  if (a.device_temperature != nullptr)
    check_tensor(*a.device_temperature, h, DType::kFloat32, {1});
  else
    check_finite(s.temperature, "temperature", true);
  check_finite(s.softcap, "softcap", true);
  check_finite(s.entropy_bound, "entropy_bound", false);
  check_finite(s.confidence, "confidence", false);
  check_finite(s.soft_scale, "soft_scale", false);

  check_impl(s.impl);
  if ((a.embed_fp8 == nullptr) != (a.embed_fp8_scale == nullptr))
    ::dgemma::throw_invalid("embed_fp8 and embed_fp8_scale must be given together");
  const bool fp8_soft = a.embed_fp8 != nullptr;
  if (fp8_soft) {
    const std::string why = fp8_soft_refused(s.impl, vocab, a.soft != nullptr);
    if (!why.empty()) ::dgemma::throw_invalid(a.embed_fp8->name + " (the FP8 self-conditioning pass) " + why);
    check_tensor(*a.embed_fp8, h, DType::kFloat8E4M3, {hidden, vh::ceil_div(vocab, vh::kBN) * vh::kBN});
    check_aligned(*a.embed_fp8, 16);
    check_tensor(*a.embed_fp8_scale, h, DType::kFloat32, {hidden});
  }

  throw_if_failed(cudaSetDevice(h.device), "cudaSetDevice");
  const int sms = multiprocessors(h.device);
  const vh::VocabHeadPlan plan = plan_for(static_cast<int>(s.impl), batch, canvas, vocab, hidden, a.soft != nullptr,
                                          sms, fp8_soft);
  const vh::VocabHeadLayout& l = plan.layout;
  const vh::VocabHeadSplits& splits = plan.splits;
  const TensorArg& ws = a.workspace;
  check_cuda(ws);
  check_same_device(h, ws);
  check_dtype(ws, DType::kUInt8);
  check_contiguous(ws);
  check_aligned(ws, 256);
  if (ws.numel() < static_cast<int64_t>(l.total))
    ::dgemma::throw_invalid(ws.name + " has " + std::to_string(ws.numel()) + " bytes, expected at least " +
                                std::to_string(l.total) + " (vocab_head_workspace_bytes)");

  vh::VocabHeadParams p;
  p.hidden = static_cast<const __nv_bfloat16*>(h.data);
  p.embed = static_cast<const __nv_bfloat16*>(a.embed.data);
  p.prev_argmax = static_cast<const int64_t*>(a.prev_argmax.data);
  p.finished_in = a.finished_in != nullptr ? static_cast<const bool*>(a.finished_in->data) : nullptr;
  p.batch = static_cast<int>(batch);
  p.canvas = static_cast<int>(canvas);
  p.vocab = static_cast<int>(vocab);
  p.dim = static_cast<int>(hidden);
  if (a.device_temperature == nullptr)
    p.inv_temperature = static_cast<float>(1.0 / static_cast<double>(static_cast<float>(s.temperature)));
  p.device_temperature =
      a.device_temperature != nullptr ? static_cast<const float*>(a.device_temperature->data) : nullptr;
  p.device_seed_step = a.device_seed_step != nullptr ? static_cast<const int64_t*>(a.device_seed_step->data) : nullptr;
  p.softcap = static_cast<float>(s.softcap);
  p.entropy_bound = static_cast<float>(s.entropy_bound);
  p.confidence = static_cast<float>(s.confidence);
  p.soft_scale = static_cast<float>(s.soft_scale);
  p.seed = s.seed;
  p.step = s.step;
  p.max_logit = static_cast<float*>(a.max_logit.data);
  p.lse = static_cast<float*>(a.lse.data);
  p.entropy = static_cast<float*>(a.entropy.data);
  p.argmax = static_cast<int64_t*>(a.argmax.data);
  p.sample = static_cast<int64_t*>(a.sample.data);
  p.accepted = static_cast<bool*>(a.accepted.data);
  p.next_canvas = static_cast<int64_t*>(a.next_canvas.data);
  p.mean_entropy = static_cast<float*>(a.mean_entropy.data);
  p.stable = static_cast<bool*>(a.stable.data);
  p.finished_out = static_cast<bool*>(a.finished_out.data);
  p.soft = a.soft != nullptr ? static_cast<__nv_bfloat16*>(a.soft->data) : nullptr;
  p.embed_fp8 = fp8_soft ? static_cast<const uint8_t*>(a.embed_fp8->data) : nullptr;
  p.embed_fp8_scale = fp8_soft ? static_cast<const float*>(a.embed_fp8_scale->data) : nullptr;
  p.impl = static_cast<int>(s.impl);
  p.wgmma_soft = plan.wgmma_soft;
  p.stats_splits = splits.stats;
  p.soft_splits = splits.soft;
  p.workspace = ws.data;
  throw_if_failed(vh::vocab_head_step(p, l, sms, h.device, reinterpret_cast<cudaStream_t>(stream)),
                  "vocab_head_step launch");
}

}  // namespace dgemma
