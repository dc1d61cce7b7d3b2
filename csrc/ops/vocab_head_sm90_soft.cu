// The vocabulary head's Hopper self-conditioning pass (kernels/vocab_head_sm90.h, vocab_head_sm90_soft.cuh).
//
// NOTE: compiled without CUTLASS's grid dependency control: CUTLASS 4.2's stream-K scheduler does not compile with
// it (its const is_last_tile binds a member to a non-const reference), so this GEMM is launched without the PDL
// attribute (run_cutlass(..., programmatic = false)) and never overlaps the kernels around it. The rescale kernel
// keeps the PDL contract like every dgemma kernel. Only device code differs from the other translation units.
#undef CUTLASS_ENABLE_GDC_FOR_SM90

#include "kernels/pdl.cuh"
#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/vocab_head_sm90.h"
#include "kernels/vocab_head_sm90_soft.cuh"

namespace dgemma::kernels::vocab_head {

static_assert(VocabSoftGemm::Kernel::SharedStorageSize <= 232448, "the P·E GEMM's shared memory");

int sm90_soft_splits(int64_t rows, int dim, int vocab, int sms) { return VocabSoftGemm::splits(rows, dim, vocab, sms); }

size_t sm90_soft_workspace(const VocabHeadParams& p, const VocabHeadLayout& l, int splits, int sms) {
  return VocabSoftGemm::Gemm::get_workspace_size(VocabSoftGemm::arguments(p, l, splits, sms, 0));
}

cudaError_t sm90_soft(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device, cudaStream_t stream) {
  const int64_t threads = l.rows * (l.vocab_pad / 8);
  cudaError_t err = launch_kernel(vocab_head_rescale_kernel, static_cast<unsigned>(ceil_div(threads, 256)), 256, 0,
                                  stream, p, l);
  if (err != cudaSuccess) return err;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  return run_cutlass<VocabSoftGemm>(VocabSoftGemm::arguments(p, l, p.soft_splits, sms, device), ws + l.cutlass,
                                    l.total - l.cutlass, device, stream, /*programmatic=*/false);
}

}  // namespace dgemma::kernels::vocab_head
