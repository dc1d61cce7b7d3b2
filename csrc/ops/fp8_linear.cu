// Launchers: per-row FP8 quantisation, the FP8 dense linear and the FP8 gated MLP (attention
// projections, the dense MLP). Same scheme as the experts: per-output-channel weight scales,
// per-token activation scales. Each GEMM is one launch of sm90_fp8_scaled_gemm (scales in its epilogue);
// the input is quantised here, or arrives quantised (x float8_e4m3fn with x_scale, e.g. from rms_norm_fp8).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/fp8_epilogue.cuh"
#include "kernels/fp8_quant.cuh"
#include "kernels/sm90_fp8_scaled_gemm.cuh"
#include "ops/moe.h"
#include "ops/moe_checks.h"

namespace dgemma {

using moe_detail::Carver;
using moe_detail::check_aligned;
using moe_detail::check_matrix;
using moe_detail::check_multiple;
using moe_detail::throw_if_failed;

namespace {

// x [rows, k] bf16 with 16-byte aligned, evenly strided rows (last dim contiguous).
int64_t check_activation(const TensorArg& x) {
  check_cuda(x);
  check_dtype(x, DType::kBFloat16);
  check_ndim(x, 2);
  if (x.strides[1] != 1) ::dgemma::throw_invalid(x.name + " must be contiguous in its last dimension");
  check_multiple(x.shape[1], 16, x.name + " last dimension");
  if (x.shape[1] > kernels::kQuantMaxCols)
    ::dgemma::throw_invalid(x.name + " last dimension " + std::to_string(x.shape[1]) + " exceeds " +
                                std::to_string(kernels::kQuantMaxCols));
  check_multiple(x.shape[0] > 1 ? x.strides[0] : x.shape[1], 8, x.name + " row stride");
  check_aligned(x, 16);
  return x.shape[0] > 1 ? x.strides[0] : x.shape[1];
}

// w_q [n, k] float8_e4m3fn + w_scale [n] fp32 on x's device.
void check_weight(const TensorArg& w_q, const TensorArg& w_scale, int64_t n, int64_t k, const TensorArg& x,
                  const char* what_n) {
  check_cuda(w_q);
  check_same_device(x, w_q);
  check_matrix(w_q, DType::kFloat8E4M3, n, k, what_n, "input features");
  check_multiple(w_q.shape[0], 8, w_q.name + " rows (output features)");
  check_aligned(w_q, 16);
  check_cuda(w_scale);
  check_same_device(x, w_scale);
  check_dtype(w_scale, DType::kFloat32);
  check_ndim(w_scale, 1);
  check_dim(w_scale, 0, w_q.shape[0], "rows of the weight");
  check_contiguous(w_scale);
  check_aligned(w_scale, 16);
}

// The GEMM's own workspace: the persistent CUTLASS kernel needs none today; asked, not assumed.
size_t gemm_workspace_bytes(int64_t rows, int n_out, int k, int sms, int device) {
  kernels::Fp8ScaledGemmProblem p;
  p.rows = static_cast<int>(rows);
  p.n_out = n_out;
  p.k = k;
  p.ldo = n_out;
  return kernels::sm90_fp8_scaled_gemm_workspace_bytes(p, sms, device);
}

struct LinearBuffers {
  uint8_t* xq;
  float* x_scale;
  void* gemm;
  size_t gemm_bytes, total;
};

LinearBuffers linear_buffers(void* base, int64_t rows, int n_out, int k, int sms, int device) {
  Carver c(base);
  LinearBuffers b;
  b.xq = c.take<uint8_t>(static_cast<size_t>(rows) * k);
  b.x_scale = c.take<float>(rows);
  b.gemm_bytes = gemm_workspace_bytes(rows, n_out, k, sms, device);
  b.gemm = c.take<uint8_t>(b.gemm_bytes);
  b.total = c.used();
  return b;
}

struct MlpBuffers {
  uint8_t* xq;
  float* x_scale;
  __nv_bfloat16* gate_up;  // [rows, 2 * inter], scaled
  uint8_t* hq;
  float* h_scale;
  void* gemm;
  size_t gemm_bytes, total;
};

MlpBuffers mlp_buffers(void* base, int64_t rows, int hidden, int inter, int sms, int device) {
  const size_t r = static_cast<size_t>(rows);
  Carver c(base);
  MlpBuffers b;
  b.xq = c.take<uint8_t>(r * hidden);
  b.x_scale = c.take<float>(r);
  b.gate_up = c.take<__nv_bfloat16>(r * 2 * inter);
  b.hq = c.take<uint8_t>(r * inter);
  b.h_scale = c.take<float>(r);
  // The three GEMMs run one after another on one stream: they share one workspace.
  // Every GEMM the call may run: gate and up fused (adjacent rows) or one after the other, then down (a stream-K
  // kernel's workspace is not monotone in the problem).
  b.gemm_bytes = std::max({gemm_workspace_bytes(rows, 2 * inter, hidden, sms, device),
                           gemm_workspace_bytes(rows, inter, hidden, sms, device),
                           gemm_workspace_bytes(rows, hidden, inter, sms, device)});
  b.gemm = c.take<uint8_t>(b.gemm_bytes);
  b.total = c.used();
  return b;
}

kernels::Fp8ScaledGemmProblem scaled_problem(const TensorArg& w_q, const TensorArg& w_scale, const uint8_t* xq,
                                             const float* x_scale, int64_t rows, __nv_bfloat16* out, int64_t ldo) {
  kernels::Fp8ScaledGemmProblem p;
  p.rows = static_cast<int>(rows);
  p.n_out = static_cast<int>(w_q.shape[0]);
  p.k = static_cast<int>(w_q.shape[1]);
  p.w = static_cast<const uint8_t*>(w_q.data);
  p.w_scale = static_cast<const float*>(w_scale.data);
  p.x = xq;
  p.x_scale = x_scale;
  p.out = out;
  p.ldo = ldo;
  return p;
}

// The GEMM input: x bf16 (quantised into the workspace here) or x float8_e4m3fn, contiguous, with x_scale [rows] fp32.
struct QuantizedInput {
  const uint8_t* q;
  const float* scale;
};

// Validates x (and x_scale); returns x's row stride when x is bf16 (to quantise), 0 when it arrives quantised.
int64_t check_gemm_input(const TensorArg& x, const TensorArg* x_scale) {
  if (x_scale == nullptr) {
    if (x.dtype == DType::kFloat8E4M3)
      ::dgemma::throw_invalid(x.name + " is float8_e4m3fn: pass its per-row scales as x_scale");
    return check_activation(x);
  }
  check_cuda(x);
  check_dtype(x, DType::kFloat8E4M3);
  check_ndim(x, 2);
  check_contiguous(x);
  check_multiple(x.shape[1], 16, x.name + " last dimension");
  check_aligned(x, 16);
  check_cuda(*x_scale);
  check_same_device(x, *x_scale);
  check_dtype(*x_scale, DType::kFloat32);
  check_ndim(*x_scale, 1);
  check_dim(*x_scale, 0, x.shape[0], "rows of x");
  check_contiguous(*x_scale);
  return 0;
}

QuantizedInput quantize_input(const TensorArg& x, const TensorArg* x_scale, int64_t x_stride, uint8_t* xq,
                              float* xs, cudaStream_t s) {
  if (x_scale != nullptr) return {static_cast<const uint8_t*>(x.data), static_cast<const float*>(x_scale->data)};
  throw_if_failed(kernels::quantize_rows(static_cast<const __nv_bfloat16*>(x.data), x_stride, x.shape[0],
                                         static_cast<int>(x.shape[1]), xq, xs, s),
                  "fp8 quantize launch");
  return {xq, xs};
}

void check_rows(int64_t rows, const TensorArg& x) {
  if (rows >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(x.name + " has " + std::to_string(rows) + " rows, expected < 2^31");
}

}  // namespace

void fp8_quantize_rows(const TensorArg& x, const TensorArg& q, const TensorArg& scale, std::uintptr_t stream) {
  const int64_t xs = check_activation(x);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  check_rows(rows, x);
  check_same_device(x, q);
  check_matrix(q, DType::kFloat8E4M3, rows, cols, "rows of x", "columns of x");
  check_aligned(q, 16);
  check_same_device(x, scale);
  check_cuda(scale);
  check_dtype(scale, DType::kFloat32);
  check_ndim(scale, 1);
  check_dim(scale, 0, rows, "rows of x");
  check_contiguous(scale);
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  throw_if_failed(kernels::quantize_rows(static_cast<const __nv_bfloat16*>(x.data), xs, rows, static_cast<int>(cols),
                                         static_cast<uint8_t*>(q.data), static_cast<float*>(scale.data),
                                         reinterpret_cast<cudaStream_t>(stream)),
                  "fp8_quantize_rows launch");
}

size_t fp8_linear_workspace_bytes(int64_t rows, int n_out, int k, int device) {
  if (rows < 0 || n_out < 1 || k < 1) ::dgemma::throw_invalid("fp8_linear_workspace_bytes: invalid sizes");
  return linear_buffers(nullptr, rows, n_out, k, moe_detail::sm_count(device), device).total;
}

void fp8_linear(const TensorArg& x, const TensorArg* x_scale, const TensorArg& w_q, const TensorArg& w_scale,
                const TensorArg& out, const TensorArg& workspace, std::uintptr_t stream) {
  const int64_t xs = check_gemm_input(x, x_scale);
  const int64_t rows = x.shape[0], k = x.shape[1];
  check_rows(rows, x);
  check_weight(w_q, w_scale, -1, k, x, "output features");
  const int64_t n_out = w_q.shape[0];
  check_same_device(x, out);
  check_matrix(out, DType::kBFloat16, rows, n_out, "rows of x", "output features");
  check_aligned(out, 16);
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  const int sms = moe_detail::sm_count(x.device);
  const int n = static_cast<int>(n_out), kk = static_cast<int>(k);
  moe_detail::check_workspace(workspace, linear_buffers(nullptr, rows, n, kk, sms, x.device).total, x.device);
  if (rows == 0) return;
  const LinearBuffers b = linear_buffers(workspace.data, rows, n, kk, sms, x.device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const QuantizedInput in = quantize_input(x, x_scale, xs, b.xq, b.x_scale, s);
  throw_if_failed(kernels::sm90_fp8_scaled_gemm(scaled_problem(w_q, w_scale, in.q, in.scale, rows,
                                                               static_cast<__nv_bfloat16*>(out.data), n_out),
                                                b.gemm, b.gemm_bytes, sms, x.device, s),
                  "fp8 GEMM");
}

size_t fp8_gated_mlp_workspace_bytes(int64_t rows, int hidden, int inter, int device) {
  if (rows < 0 || hidden < 1 || inter < 1) ::dgemma::throw_invalid("fp8_gated_mlp_workspace_bytes: invalid sizes");
  return mlp_buffers(nullptr, rows, hidden, inter, moe_detail::sm_count(device), device).total;
}

void fp8_gated_mlp(const TensorArg& x, const TensorArg* x_scale, const TensorArg& gate_q, const TensorArg& gate_scale,
                   const TensorArg& up_q, const TensorArg& up_scale, const TensorArg& down_q,
                   const TensorArg& down_scale, const TensorArg& out, const TensorArg& workspace,
                   std::uintptr_t stream) {
  const int64_t xs = check_gemm_input(x, x_scale);
  const int64_t rows = x.shape[0], hidden = x.shape[1];
  check_rows(rows, x);
  check_weight(gate_q, gate_scale, -1, hidden, x, "intermediate");
  const int64_t inter = gate_q.shape[0];
  check_multiple(inter, 16, gate_q.name + " rows (intermediate)");
  if (inter > kernels::kGeluUpMaxInter)
    ::dgemma::throw_invalid(gate_q.name + " has " + std::to_string(inter) + " rows, expected at most " +
                                std::to_string(kernels::kGeluUpMaxInter));
  check_weight(up_q, up_scale, inter, hidden, x, "intermediate (rows of gate)");
  check_weight(down_q, down_scale, hidden, inter, x, "hidden");
  check_same_device(x, out);
  check_matrix(out, DType::kBFloat16, rows, hidden, "rows of x", "hidden");
  check_aligned(out, 16);
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  const int sms = moe_detail::sm_count(x.device);
  const int H = static_cast<int>(hidden), I = static_cast<int>(inter);
  moe_detail::check_workspace(workspace, mlp_buffers(nullptr, rows, H, I, sms, x.device).total, x.device);
  if (rows == 0) return;
  const MlpBuffers b = mlp_buffers(workspace.data, rows, H, I, sms, x.device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const QuantizedInput in = quantize_input(x, x_scale, xs, b.xq, b.x_scale, s);
  // gate into columns [0, I) of gate_up, up into [I, 2I), both scaled: one GEMM when up's rows (and scales)
  // directly follow gate's in memory (a [gate; up] weight, as the ops layer stores it), else two.
  const auto* gq = static_cast<const uint8_t*>(gate_q.data);
  const auto* gs = static_cast<const float*>(gate_scale.data);
  const bool adjacent = static_cast<const uint8_t*>(up_q.data) == gq + inter * hidden &&
                        static_cast<const float*>(up_scale.data) == gs + inter;
  kernels::Fp8ScaledGemmProblem g1 = scaled_problem(gate_q, gate_scale, in.q, in.scale, rows, b.gate_up, 2 * inter);
  if (adjacent) {
    g1.n_out = 2 * I;
    throw_if_failed(kernels::sm90_fp8_scaled_gemm(g1, b.gemm, b.gemm_bytes, sms, x.device, s), "fp8 GEMM gate/up");
  } else {
    throw_if_failed(kernels::sm90_fp8_scaled_gemm(g1, b.gemm, b.gemm_bytes, sms, x.device, s), "fp8 GEMM gate");
    kernels::Fp8ScaledGemmProblem g_up =
        scaled_problem(up_q, up_scale, in.q, in.scale, rows, b.gate_up + inter, 2 * inter);
    throw_if_failed(kernels::sm90_fp8_scaled_gemm(g_up, b.gemm, b.gemm_bytes, sms, x.device, s), "fp8 GEMM up");
  }
  const kernels::GeluUpScales prescaled{nullptr, nullptr, 0, nullptr, nullptr};
  throw_if_failed(kernels::gelu_up_quantize(b.gate_up, nullptr, rows, I, prescaled, b.hq, b.h_scale, s),
                  "gelu_up_quantize launch");
  throw_if_failed(kernels::sm90_fp8_scaled_gemm(scaled_problem(down_q, down_scale, b.hq, b.h_scale, rows,
                                                               static_cast<__nv_bfloat16*>(out.data), hidden),
                                                b.gemm, b.gemm_bytes, sms, x.device, s),
                  "fp8 GEMM down");
}

}  // namespace dgemma
