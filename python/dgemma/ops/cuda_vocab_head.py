"""Python wrappers of the fused vocabulary head (``csrc/ops/vocab_head.cu``).

:func:`vocab_head_step` replaces, for one denoising step, the lm_head GEMM, the softcap, the fp32
softmax, the multinomial draw, the entropy, the acceptance sort and the self-conditioning
``softmax(logits) @ E`` with five kernel launches that never write fp32 logits. Its random stream is
dgemma's own Philox stream (documented in :mod:`dgemma.vocab_head`, which holds the CPU reference).
"""

from __future__ import annotations

import functools

import torch

from .. import _ext
from ..errors import DgemmaError
from ..vocab_head import SOFT_PRECISIONS, VocabHeadStep, seed_key


# The implementations of the head's two GEMMs (csrc/kernels/vocab_head_params.cuh kImpl*): "mma_sync" (mma.sync +
# cp.async kernels) and "wgmma" (CUTLASS sm90 TMA + wgmma GEMMs, the statistics in the first GEMM's epilogue).
IMPLS = {"mma_sync": 0, "wgmma": 1}
DEFAULT_IMPL = "wgmma"  # H200: 2.73 / 8.29 ms at batch 1 / 4 against mma_sync's 4.62 / 16.7 (bench_vocab_head)


def head_impl(impl: str | None = None) -> str:
    """``impl``, or DGEMMA_VOCAB_HEAD (looked up at each call), or the default; checked against :data:`IMPLS`."""
    return _ext.implementation(impl, "DGEMMA_VOCAB_HEAD", IMPLS, DEFAULT_IMPL, "a vocabulary-head implementation")


def soft_precision() -> str:
    """The self-conditioning product's precision, DGEMMA_VOCAB_HEAD_SOFT (looked up at each call): "bf16" (the
    default) or "fp8" (P·E on FP8 tensor cores: the probabilities in e5m2, Eᵀ in e4m3, half the bf16 pass's time on
    paper; its error against bf16 is stated in tests/test_vocab_head_fp8_soft.py). The engine reads it when it
    loads weights (:meth:`CudaOps.prepare_weights` builds the FP8 table)."""
    return _ext.implementation(None, "DGEMMA_VOCAB_HEAD_SOFT", SOFT_PRECISIONS, "bf16",
                               "a self-conditioning precision")


def check_fp8_soft(vocab: int, hidden: int, device: torch.device) -> None:
    """Refuse (DgemmaError naming the settings) DGEMMA_VOCAB_HEAD_SOFT=fp8 where the extension's head cannot run the
    FP8 pass with DGEMMA_VOCAB_HEAD's implementation at this vocabulary and hidden size: the engine asks at load."""
    try:
        workspace_bytes(1, 1, vocab, hidden, device=device, fp8_soft=True)
    except ValueError as e:
        raise DgemmaError(f"DGEMMA_VOCAB_HEAD_SOFT=fp8 cannot run with DGEMMA_VOCAB_HEAD={head_impl()} here: {e}") \
            from None


def workspace_bytes(batch: int, canvas: int, vocab: int, hidden: int, *, self_conditioning: bool = True,
                    device: torch.device | None = None, impl: str | None = None, fp8_soft: bool = False) -> int:
    """Bytes of the uint8 workspace one :func:`vocab_head_step` call of ``impl`` (:func:`head_impl`) needs (split
    counts follow the device's multiprocessor count). With self-conditioning it holds the bf16 probabilities,
    ``batch·canvas·vocab·2`` bytes (134 MB per 256-token sequence at vocab 262144); ``fp8_soft`` (a call given
    ``embed_fp8``) adds their e4m3 copy."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _workspace_bytes(batch, canvas, vocab, hidden, self_conditioning, index, IMPLS[head_impl(impl)],
                            bool(fp8_soft))


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(batch: int, canvas: int, vocab: int, hidden: int, self_conditioning: bool, index: int,
                     impl: int, fp8_soft: bool) -> int:
    return int(_ext.require_cuda().vocab_head_workspace_bytes(batch, canvas, vocab, hidden, self_conditioning,
                                                              index, impl, fp8_soft))


@functools.lru_cache(maxsize=64)
def _bf16_scale(scale: float) -> float:
    # The reference multiplies by the scale rounded to the table dtype (sqrt(2816) is 53.0 in bf16).
    return float(torch.tensor(scale, dtype=torch.float32).to(torch.bfloat16))


def vocab_head_step(h: torch.Tensor, embed: torch.Tensor, temperature: float | torch.Tensor, seed: int | torch.Tensor,
                    step: int | None,
                    canvas: torch.Tensor, prev_argmax: torch.Tensor | None, entropy_bound: float, *,
                    confidence_threshold: float = 0.005, finished: torch.Tensor | None = None,
                    softcap: float = 30.0, soft_scale: float | None = None, self_conditioning: bool = True,
                    workspace: torch.Tensor | None = None, out: VocabHeadStep | None = None,
                    impl: str | None = None, embed_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> VocabHeadStep:
    """One denoising step's vocabulary head on the GPU.

    Args:
        h: final-normed decoder hidden states, bf16 CUDA ``[B, C, H]`` (H a multiple of 64, C <= 1024).
        embed: the tied embedding table E, bf16 ``[V, H]`` on h's device.
        temperature: t of this step: a float, or a one-element fp32 CUDA tensor on h's device that the
            kernels read (never the host: for CUDA-graph replay; it must hold a positive finite value); the
            processed logits are ``z = softcap·tanh((h·Eᵀ)/softcap) / t``.
        seed, step: key and step counter of the Philox stream; ``step`` must differ between calls that
            share a seed (count every denoising step of the generation, across blocks). ``seed`` may instead
            be an int64 CUDA tensor ``[2]`` holding (seed bits, step), read by the kernels, with ``step`` None.
        canvas: the current canvas, int64 ``[B, C]``; rows of ``finished`` sequences keep it.
        prev_argmax: the previous step's argmax canvas, int64 ``[B, C]``, or None on a block's first step
            (then no sequence is stable).
        entropy_bound: acceptance bound on ``cumsum − current`` of the sorted entropies.
        confidence_threshold: a sequence finishes when stable and its mean entropy is below this.
        finished: bool ``[B]`` of sequences already finished (their canvas and argmax are kept), or None.
        softcap: the final logit softcap (30 for the model).
        soft_scale: scale of the self-conditioning input, rounded to bf16 like the reference
            (default ``sqrt(H)``, the model's embed scale).
        self_conditioning: compute ``soft = softmax(z)·E·scale`` (bf16 ``[B, C, H]``) for the next step.
        workspace: optional uint8 CUDA buffer of at least :func:`workspace_bytes` bytes (for the same ``impl``).
        out: optional preallocated outputs (shapes and dtypes as returned); written in place, except that
            ``next_canvas``/``argmax`` are replaced by new tensors when ``finished`` is given.
        impl: the GEMMs, a name of :data:`IMPLS` (default: DGEMMA_VOCAB_HEAD, else ``"mma_sync"``); outputs agree
            within the tests' bounds, not bit for bit (the products are summed in another order).
        embed_fp8: the FP8 self-conditioning operand (:func:`dgemma.vocab_head.embedding_fp8` of ``embed``: e4m3
            ``[H, vocab_pad]`` and fp32 scales ``[H]``): ``soft`` is then the FP8 product
            (:func:`dgemma.vocab_head.fp8_soft_embedding`); ``impl`` "wgmma" with self-conditioning only.
    Returns:
        :class:`dgemma.vocab_head.VocabHeadStep` of CUDA tensors (``soft`` None without self-conditioning).
    """
    lib = _ext.require_cuda()
    impl = head_impl(impl)
    if h.dim() != 3:
        raise ValueError(f"hidden has shape {list(h.shape)}, expected [batch, canvas, hidden]")
    b, c, hidden = h.shape
    device = h.device
    device_seed_step = device_temperature = None
    if isinstance(seed, torch.Tensor):
        if step is not None:
            raise ValueError("step must be None when seed is a (seed, step) tensor")
        device_seed_step, seed, step = seed, 0, 0
    elif step is None:
        raise ValueError("step is required when seed is an int")
    seed_key(seed)
    if not 0 <= step < 2**32:
        raise ValueError(f"step {step} must be in [0, 2**32)")
    if isinstance(temperature, torch.Tensor):
        if temperature.is_cuda:
            device_temperature, temperature = temperature.reshape(1), 1.0
        else:
            temperature = float(temperature)
    if prev_argmax is None:
        prev_argmax = torch.full((b, c), -1, dtype=torch.int64, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    flag = dict(dtype=torch.bool, device=device)
    out = out or VocabHeadStep(argmax=torch.empty(b, c, **i64), sample=torch.empty(b, c, **i64),
                        next_canvas=torch.empty(b, c, **i64), accepted=torch.empty(b, c, **flag),
                        entropy=torch.empty(b, c, **f32), max_logit=torch.empty(b, c, **f32),
                        lse=torch.empty(b, c, **f32), mean_entropy=torch.empty(b, **f32),
                        stable=torch.empty(b, **flag), finished=torch.empty(b, **flag),
                        soft=torch.empty(b, c, hidden, dtype=torch.bfloat16, device=device)
                        if self_conditioning else None)
    if (out.soft is not None) != self_conditioning:
        raise ValueError("out.soft must be given exactly when self_conditioning is True")
    # The extension checks the FP8 operand (impl, self-conditioning, vocabulary, shapes) and names what is wrong.
    fp8_q, fp8_scale = (None, None) if embed_fp8 is None else embed_fp8
    if workspace is None:
        size = workspace_bytes(b, c, embed.shape[0], hidden, self_conditioning=self_conditioning, device=device,
                               impl=impl, fp8_soft=embed_fp8 is not None)
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
    scale = _bf16_scale(hidden ** 0.5 if soft_scale is None else soft_scale)
    lib.vocab_head_step(h, embed, prev_argmax, finished, out.max_logit, out.lse, out.entropy, out.argmax, out.sample,
                        out.accepted, out.next_canvas, out.mean_entropy, out.stable, out.finished, out.soft,
                        workspace, float(temperature), float(softcap), float(entropy_bound),
                        float(confidence_threshold), scale, int(seed), int(step),
                        _ext.current_stream(device), device_seed_step, device_temperature, IMPLS[impl], fp8_q,
                        fp8_scale)
    if finished is not None:
        out.next_canvas = torch.where(finished[:, None], canvas, out.next_canvas)
        out.argmax = torch.where(finished[:, None], prev_argmax, out.argmax)
    return out
