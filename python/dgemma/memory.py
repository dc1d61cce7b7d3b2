"""Memory plan of an engine: weights, KV cache for a batch and context, and per-step workspace."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _ext
from .config import ModelConfig
from .errors import DgemmaError, OutOfMemoryError

GiB = 2**30


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    weights: int
    kv_cache: int
    workspace: int
    batch: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def __str__(self) -> str:
        return (f"weights {self.weights / GiB:.2f} GiB + KV cache {self.kv_cache / GiB:.2f} GiB "
                f"(batch {self.batch}, context {self.context}) + workspace {self.workspace / GiB:.2f} GiB "
                f"= {self.total / GiB:.2f} GiB")


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, dtype: torch.dtype, rollback: int = 0) -> int:
    """Bytes of a :class:`~dgemma.cache.KVCache` of ``batch`` x ``context`` tokens (keys and values)."""
    item = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for spec in cfg.layers:
        slots = min(context, spec.window - 1 + rollback) if spec.is_sliding else context
        total += 2 * batch * spec.num_kv_heads * slots * spec.head_dim * item
    return total + batch * context  # the validity mask


def step_workspace_bytes(cfg: ModelConfig, batch: int, context: int, dtype: torch.dtype, *,
                         fused_vocab_head: bool) -> int:
    """Peak temporary memory of a denoising step, as an estimate.

    Without the fused vocabulary head the step holds fp32 logits [B, C, V] and about three more
    tensors of that size (processed logits, probabilities, the next step's self-conditioning logits);
    with it, the head's workspace (below). Activations: the widest projection of the canvas, the attention
    scores of one layer's full-attention keys, and the MoE's routed rows.
    """
    item = torch.tensor([], dtype=dtype).element_size()
    tokens = batch * cfg.canvas_length
    widest = max(cfg.intermediate_size * 2, cfg.num_heads * max(s.head_dim for s in cfg.layers), cfg.hidden_size)
    activations = 6 * tokens * widest * item
    scores = batch * cfg.num_heads * cfg.canvas_length * (context + cfg.canvas_length) * 4
    # The MoE's routed rows (FP8 input, bf16 gate/up, FP8 intermediate, bf16 down projection, and a few scales and
    # indices per row), each expert's padded to whole GEMM tiles by the CUDA pipeline (csrc/ops/moe.cu).
    rows = _moe_rows(tokens * cfg.top_k, cfg.num_experts)
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    moe = rows * (h + 4 * i + i + 2 * h + 24)
    # The fused head's workspace (csrc/kernels/vocab_head_params.cuh): the bf16 probabilities its P·E pass reads (rows x
    # vocab rounded up to 128), one fp32 maximum per 64 of them, and the split-K partial sums of that pass (at most 16
    # splits of fp32 [rows, hidden]).
    vocab_pad, rows_pad = -(-cfg.vocab_size // 128) * 128, -(-tokens // 128) * 128
    head = tokens * vocab_pad * 2 + rows_pad * (vocab_pad // 64) * 4 + 16 * tokens * cfg.hidden_size * 4
    if os.environ.get("DGEMMA_VOCAB_HEAD_STATS", "").startswith("two_pass"):
        head += tokens * vocab_pad * 4  # the two-pass statistics keep the fp32 logits between their passes
    if os.environ.get("DGEMMA_VOCAB_HEAD_SOFT") == "fp8":
        # The e5m2 probabilities and row scales of the FP8 P·E pass, and its e4m3 table Eᵀ with its channel scales
        # (held from load on, counted here with the head that reads it).
        head += tokens * (vocab_pad + 4) + cfg.hidden_size * (vocab_pad + 4)
    logits = head if fused_vocab_head else 4 * tokens * cfg.vocab_size * 4
    return activations + scores + moe + logits


def _moe_rows(routed: int, experts: int) -> int:
    """Rows of the MoE's intermediates for ``routed`` (token, expert) pairs: the CUDA pipeline pads each expert's rows
    to its GEMM's token tile (asked of the extension); without the extension no kernel pads (the routed rows)."""
    try:
        tile = _ext.extension().moe_gemm_tile(routed, max(experts, 1))
    except DgemmaError:
        return routed
    return routed + experts * (tile - 1)


def plan(cfg: ModelConfig, weights_bytes: int, batch: int, context: int, dtype: torch.dtype, *,
         fused_vocab_head: bool = False) -> MemoryPlan:
    if batch <= 0 or context <= 0:
        raise DgemmaError(f"batch ({batch}) and context ({context}) must be positive")
    if context > cfg.max_position_embeddings:
        raise DgemmaError(f"context {context} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    return MemoryPlan(weights=weights_bytes, kv_cache=kv_cache_bytes(cfg, batch, context, dtype),
                      workspace=step_workspace_bytes(cfg, batch, context, dtype, fused_vocab_head=fused_vocab_head),
                      batch=batch, context=context)


def check_fits(p: MemoryPlan, free_bytes: int, *, already_resident: int = 0) -> None:
    """Refuse, with the numbers, a plan that does not fit the device's free memory.

    ``already_resident``: bytes of the plan already allocated (e.g. the loaded weights)."""
    need = p.total - already_resident
    if need > free_bytes:
        raise OutOfMemoryError(f"batch {p.batch} x context {p.context} does not fit: needs {need / GiB:.2f} GiB "
                               f"more ({p}), {free_bytes / GiB:.2f} GiB free; lower the batch or the context")
