#pragma once

#include <cstdint>
#include <string>

#include "ops/tensor_arg.h"

namespace dgemma {

// The tensors of one fused vocabulary-head call (see csrc/kernels/vocab_head.cuh). B = batch, C = canvas,
// V = vocab, H = hidden. All CUDA tensors on one device, contiguous.
struct VocabHeadArgs {
  TensorArg hidden;        // bf16 [B, C, H], H a multiple of 64
  TensorArg embed;         // bf16 [V, H]
  TensorArg prev_argmax;   // int64 [B, C]
  const TensorArg* finished_in = nullptr;  // bool [B] or absent
  TensorArg max_logit, lse, entropy;       // fp32 [B, C]
  TensorArg argmax, sample, next_canvas;   // int64 [B, C]
  TensorArg accepted;                      // bool [B, C]
  TensorArg mean_entropy;                  // fp32 [B]
  TensorArg stable, finished_out;          // bool [B]
  const TensorArg* soft = nullptr;         // bf16 [B, C, H] or absent (no self-conditioning pass)
  TensorArg workspace;                     // uint8 [>= vocab_head_workspace_bytes(...)]
  // Optional device-resident step scalars (read by the kernels; replace the host seed/step/temperature):
  const TensorArg* device_seed_step = nullptr;    // int64 [2]: seed (uint64 bits), step
  const TensorArg* device_temperature = nullptr;  // fp32 [1]: t > 0 (not checked: it is never read on the host)
  // Optional FP8 self-conditioning operand (both or neither; impl 1 with soft): Eᵀ in e4m3 [H, vocab_pad] (vocab_pad
  // = V rounded up to 128, zero columns past V) and its per-hidden-channel scales fp32 [H].
  const TensorArg* embed_fp8 = nullptr;
  const TensorArg* embed_fp8_scale = nullptr;
};

struct VocabHeadScalars {
  double temperature = 1.0, softcap = 30.0, entropy_bound = 0.1, confidence = 0.005, soft_scale = 1.0;
  uint64_t seed = 0;
  uint32_t step = 0;
  int64_t impl = 0;  // the GEMMs: 0 mma.sync, 1 CUTLASS sm90 wgmma (kernels/vocab_head_params.cuh kImpl*)
};

// Why the fused head cannot run a problem of these sizes, or "" when it can (the launcher's own limits).
std::string vocab_head_unsupported(int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden);
// Bytes of workspace one call of implementation `impl` needs on `device` (split counts depend on its SM count);
// fp8_soft: a call given the FP8 self-conditioning operand.
int64_t vocab_head_workspace_bytes(int64_t batch, int64_t canvas, int64_t vocab, int64_t hidden, bool with_soft,
                                   int device, int64_t impl, bool fp8_soft = false);

// Validates every argument (ValueError naming it) and enqueues the fused head on `stream`.
void vocab_head_step(const VocabHeadArgs& args, const VocabHeadScalars& scalars, std::uintptr_t stream);

}  // namespace dgemma
