"""FP8 (E4M3) quantisation: the CPU reference of the scheme dgemma's FP8 kernels use.

Weights: one fp32 scale per output channel (row of a ``[..., out, in]`` weight); activations: one
fp32 scale per token (row), computed dynamically. For a row ``x``::

    scale = max(amax(|x|), 1e-12) / 448
    q     = float8_e4m3fn(clamp(x / scale, -448, 448))      # round to nearest even
    x    ~= float(q) * scale

The CUDA kernels (``csrc/kernels/fp8_quant.cuh``) compute exactly these values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import is_quantized_name

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Keeps an all-zero row's scale finite (its quantised values are then 0).
MIN_AMAX = 1e-12
QUANTIZATIONS = ("fp8",)


@dataclass(slots=True)
class Fp8Weight:
    """A weight ``[..., out, in]`` as E4M3 values ``q`` and fp32 per-output-channel scales ``[..., out]``."""

    q: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if self.q.dtype != FP8_DTYPE:
            raise ValueError(f"Fp8Weight.q has dtype {self.q.dtype}, expected {FP8_DTYPE}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != tuple(self.q.shape[:-1]):
            raise ValueError(f"Fp8Weight.scale has dtype {self.scale.dtype} and shape {list(self.scale.shape)}, "
                             f"expected float32 {list(self.q.shape[:-1])}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def numel(self) -> int:
        """Parameters (the scales are bookkeeping, ~1/hidden of the bytes)."""
        return self.q.numel()

    def element_size(self) -> int:
        """Bytes per parameter of ``q`` (so ``numel() * element_size()`` counts the weight bytes)."""
        return 1

    def __getitem__(self, index) -> "Fp8Weight":
        """The weight of one expert (or any leading-dimension index)."""
        return Fp8Weight(self.q[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, dtype)

    def to(self, device) -> "Fp8Weight":
        return Fp8Weight(self.q.to(device), self.scale.to(device))


@dataclass(frozen=True, slots=True)
class Fp8Rows:
    """Activations quantised per row, as the FP8 GEMMs take them: ``q`` ``[rows, k]`` E4M3 (contiguous) and
    ``scale`` ``[rows]`` fp32; ``lead`` is the leading shape of the activations they came from (rows is its
    product), so a GEMM's output takes the shape ``(*lead, n_out)``."""

    q: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]


def fuse_rows(parts: list) -> tuple[Fp8Weight, list[Fp8Weight]] | None:
    """One FP8 weight ``[p0; p1; ...]`` (rows stacked, scales alike) and a view of its rows for each part, equal to
    the part: several projections of one input then run as one GEMM, with no second copy of the weights once the
    caller keeps the views in place of the parts (parts already adjacent in memory are viewed, not copied). None
    unless every part is a 2-D :class:`Fp8Weight` of one input size on one device."""
    if not parts or not all(isinstance(p, Fp8Weight) and p.q.dim() == 2 for p in parts):
        return None
    if len({(p.q.shape[1], p.q.device) for p in parts}) != 1:
        return None
    total = sum(p.q.shape[0] for p in parts)
    if all(rows_adjacent(a, b) for a, b in zip(parts, parts[1:])):
        # Already one allocation (e.g. views made here before, passed on to another model): view it, copy nothing.
        first = parts[0]
        return Fp8Weight(first.q.as_strided((total, first.q.shape[1]), (first.q.shape[1], 1)),
                         first.scale.as_strided((total,), (1,))), list(parts)
    fused = Fp8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    rows, views = 0, []
    for p in parts:
        n = p.q.shape[0]
        views.append(Fp8Weight(fused.q[rows:rows + n], fused.scale[rows:rows + n]))
        rows += n
    return fused, views


def rows_adjacent(first: Fp8Weight, second: Fp8Weight) -> bool:
    """Whether ``second``'s rows (and scales) directly follow ``first``'s in memory: the two are one weight
    ``[first; second]`` (see :func:`fuse_rows`)."""
    return (first.q.is_contiguous() and second.q.is_contiguous() and first.scale.is_contiguous()
            and second.scale.is_contiguous() and first.q.dim() == second.q.dim() == 2
            and first.q.shape[1] == second.q.shape[1]
            and second.q.data_ptr() == first.q.data_ptr() + first.q.numel()
            and second.scale.data_ptr() == first.scale.data_ptr() + 4 * first.scale.numel())


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1).float()
    # NOTE: divide by a tensor on x's device, never by the Python number: CUDA turns division by a CPU
    # scalar into a multiplication by its fp32 reciprocal (1/448 is inexact), which can be one ulp off
    # the IEEE quotient the kernels compute (fp8_scale_from_amax).
    return amax.clamp(min=MIN_AMAX) / torch.full_like(amax, FP8_MAX)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): E4M3 ``q`` of x's shape and fp32 ``scale`` ``x.shape[:-1]``, one scale per row."""
    xf = x.float()
    scale = _row_scale(xf)
    # Elementwise tensor / tensor: an IEEE division on every device, like the kernels' __fdiv_rn.
    q = torch.clamp(xf / scale.unsqueeze(-1), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """Per-output-channel quantisation of a ``[..., out, in]`` weight (any float dtype)."""
    if w.dim() < 2:
        raise ValueError(f"a weight to quantise needs at least 2 dimensions, got shape {list(w.shape)}")
    q, scale = quantize_rows(w)
    return Fp8Weight(q, scale)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantisation of activations ``[..., hidden]`` (the kernels do this inside their pipeline)."""
    return quantize_rows(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float(q) * scale (per row), in fp32, then cast to ``dtype``."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


# -- FP8-faithful references of the dense FP8 kernels (what the CUDA ops compute, up to the tensor cores'
# accumulation order): the bound tests and benchmarks judge them by. ---------------------------------------


def scaled_gemm_reference(xq: torch.Tensor, x_scale: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """``sm90_fp8_scaled_gemm``: the product of E4M3 values ``xq [rows, k] . w.q^T`` (exact in fp64, rounded to
    fp32), times the row's scale, times the channel's scale, in fp32, rounded once to bf16 (its epilogue)."""
    acc = (xq.double() @ w.q.double().t()).float()
    return ((acc * x_scale[:, None]) * w.scale[None, :]).bfloat16()


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))."""
    inner = 0.7978845608028654 * (0.044715 * x * (x * x) + x)
    return 0.5 * x * (1.0 + torch.tanh(inner))


def linear_reference(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """``fp8_linear`` of ``x [..., k]`` bf16: quantised per row, one scaled GEMM."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    return scaled_gemm_reference(xq, xs, w).reshape(*x.shape[:-1], w.q.shape[0])


def gated_mlp_reference(x: torch.Tensor, gate: Fp8Weight, up: Fp8Weight, down: Fp8Weight) -> torch.Tensor:
    """``fp8_gated_mlp``: x quantised per row, scaled gate/up GEMMs (bf16), gelu·up in fp32 re-quantised per row,
    the scaled down GEMM."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    g, u = (scaled_gemm_reference(xq, xs, w).float() for w in (gate, up))
    hq, hs = quantize_rows(gelu_tanh_reference(g) * u)
    return scaled_gemm_reference(hq, hs, down).reshape(*x.shape[:-1], down.q.shape[0])


def as_float(w, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor of ``dtype``: dequantised when it is an :class:`Fp8Weight`."""
    return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w.to(dtype)


def fp8_transform(key: str, t: torch.Tensor, device: torch.device):
    """Load-time hook: quantise the tensors :func:`dgemma.weights.is_quantized_name` selects (every attention
    projection, the dense MLP and every expert; the embedding/lm_head, router and self-conditioning stay in the
    model dtype), on ``device``.

    The bf16/fp32 source tensor is moved to the device one tensor at a time and dropped after
    quantisation, so the peak is the FP8 model plus one source tensor (and its fp32 temporaries).
    Experts are quantised one expert at a time to keep those temporaries small.
    """
    if not is_quantized_name(key):
        return None
    if t.dim() == 3:
        q = torch.empty(t.shape, dtype=FP8_DTYPE, device=device)
        scale = torch.empty(t.shape[:-1], dtype=torch.float32, device=device)
        for e in range(t.shape[0]):
            q[e], scale[e] = quantize_rows(t[e].to(device))
        return Fp8Weight(q, scale)
    return quantize_weight(t.to(device))
