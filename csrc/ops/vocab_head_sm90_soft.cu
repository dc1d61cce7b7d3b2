// The vocabulary head's Hopper self-conditioning pass (kernels/vocab_head_sm90.h, vocab_head_sm90_soft.cuh).
//
// NOTE: compiled without CUTLASS's grid dependency control: CUTLASS 4.2's stream-K scheduler does not compile with
// it (its const is_last_tile binds a member to a non-const reference), so this GEMM is launched without the PDL
// attribute (run_cutlass(..., programmatic = false)) and never overlaps the kernels around it. The rescale kernel
// keeps the PDL contract like every dgemma kernel. Only device code differs from the other translation units.
#undef CUTLASS_ENABLE_GDC_FOR_SM90

#include "kernels/pdl.cuh"
#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/sm90_fp8_scaled_gemm_impl.cuh"
#include "kernels/vocab_head_sm90.h"
#include "kernels/vocab_head_sm90_soft.cuh"

namespace dgemma::kernels::vocab_head {

static_assert(VocabSoftGemm::Kernel::SharedStorageSize <= 232448, "the P·E GEMM's shared memory");

namespace {

// The FP8 P·E GEMM: the dense FP8 GEMM's kernel (weights = Eᵀ in e4m3 [dim, vocab_pad], tokens = the e5m2
// probabilities [rows, vocab_pad], out = soft [rows, dim], the scales in its epilogue) with 128-row token tiles, the
// K loop (the vocabulary) shared out over the SMs by the stream-K scheduler (a few dozen output tiles, each 2,048 K
// tiles deep) and reduced in a fixed order, and fp32 promotion of every K tile (FP8FastAccum's tensor-core
// accumulation is not exact enough over 262,144 products).
using SoftMainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using SoftFp8Gemm =
    sm90_fp8_scaled::ScaledGemm<128, 1, cutlass::gemm::StreamKScheduler, SoftMainloop, cutlass::float_e5m2_t>;
static_assert(SoftFp8Gemm::Kernel::SharedStorageSize <= 232448, "the FP8 P·E GEMM's shared memory");

Fp8ScaledGemmProblem soft_fp8_problem(const VocabHeadParams& p, const VocabHeadLayout& l) {
  const unsigned char* ws = static_cast<const unsigned char*>(p.workspace);
  Fp8ScaledGemmProblem g;
  g.rows = static_cast<int>(l.rows);
  g.n_out = p.dim;
  g.k = static_cast<int>(l.vocab_pad);
  g.w = p.embed_fp8;
  g.w_scale = p.embed_fp8_scale;
  g.x = ws != nullptr ? ws + l.probs_fp8 : nullptr;  // no workspace: a plan's size query
  g.x_scale = ws != nullptr ? reinterpret_cast<const float*>(ws + l.soft_row_scale) : nullptr;
  g.out = p.soft;
  g.ldo = p.dim;
  return g;
}

}  // namespace

size_t sm90_soft_fp8_workspace(const VocabHeadParams& p, const VocabHeadLayout& l, int sms) {
  return sm90_fp8_scaled::workspace_bytes<128, 1, cutlass::gemm::StreamKScheduler, SoftMainloop,
                                          cutlass::float_e5m2_t>(soft_fp8_problem(p, l), sms, 0);
}

int sm90_soft_splits(int64_t rows, int dim, int vocab, int sms) { return VocabSoftGemm::splits(rows, dim, vocab, sms); }

size_t sm90_soft_workspace(const VocabHeadParams& p, const VocabHeadLayout& l, int splits, int sms) {
  return VocabSoftGemm::Gemm::get_workspace_size(VocabSoftGemm::arguments(p, l, splits, sms, 0));
}

cudaError_t sm90_soft(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device, cudaStream_t stream) {
  const int64_t threads = l.rows * (l.vocab_pad / 8);
  if (p.embed_fp8 != nullptr) {
    const cudaError_t err = launch_kernel(vocab_head_rescale_fp8_kernel, static_cast<unsigned>(ceil_div(threads, 256)),
                                          256, 0, stream, p, l);
    if (err != cudaSuccess) return err;
    unsigned char* ws = static_cast<unsigned char*>(p.workspace);
    return sm90_fp8_scaled::run<128, 1, cutlass::gemm::StreamKScheduler, SoftMainloop, cutlass::float_e5m2_t>(
        soft_fp8_problem(p, l), ws + l.cutlass, l.total - l.cutlass, sms, device, stream);
  }
  cudaError_t err = launch_kernel(vocab_head_rescale_kernel, static_cast<unsigned>(ceil_div(threads, 256)), 256, 0,
                                  stream, p, l);
  if (err != cudaSuccess) return err;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  return run_cutlass<VocabSoftGemm>(VocabSoftGemm::arguments(p, l, p.soft_splits, sms, device), ws + l.cutlass,
                                    l.total - l.cutlass, device, stream, /*programmatic=*/false);
}

}  // namespace dgemma::kernels::vocab_head
