"""FP8 Mixture-of-Experts and FP8 linear layers on Hopper (``dgemma._C``'s moe domain).

The MoE layer runs as one device-side pipeline with no host synchronisation (CUDA-graph safe):
router -> dispatch plan (per-expert offsets, token permutation) -> per-token FP8 quantisation of the
gathered rows -> grouped FP8 GEMM gate_up (CUTLASS sm90 pointer-array) -> gelu_tanh(gate)·up + FP8
quantisation -> grouped FP8 GEMM down -> weighted, deterministic un-permute into bf16.

Weights are :class:`~dgemma.quant.Fp8Weight` (E4M3 + one fp32 scale per output channel); activations
are quantised per token inside the pipeline. The dense linears and the dense MLP run one scaled GEMM per
projection (sm90_fp8_scaled_gemm: both scales in the epilogue), their input quantised by the preceding norm
where the model has one (:func:`rms_norm_fp8`). :func:`plan_dispatch` is the reference of the device plan.
"""

from __future__ import annotations

import functools

import torch

from .. import _ext
from ..quant import Fp8Rows, Fp8Weight

_workspaces: dict[tuple[torch.device, int], torch.Tensor] = {}
# Uses of each cached workspace: ExpertRows remember the one that wrote them, to detect a later overwrite.
_generations: dict[tuple[torch.device, int], int] = {}


def _stream(device: torch.device) -> int:
    return _ext.current_stream(device)


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(query: str, *sizes) -> int:
    """A ``*_workspace_bytes`` query of the extension, remembered per problem size and device (each call
    would otherwise ask the driver for the device's properties)."""
    return int(getattr(_ext.require_cuda(), query)(*sizes))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    """A cached uint8 scratch buffer of at least ``nbytes`` on ``device``, reused by every call on the
    current stream (grown, never shrunk). While a CUDA graph is being captured it is a new buffer from the
    graph's own memory pool instead: a cached buffer could later be replaced (freed) under a graph."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    key = (device, _ext.current_stream(device))
    _generations[key] = _generations.get(key, 0) + 1  # whatever the previous user left there is gone
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < nbytes:
        # A normal tensor even when the first caller runs in inference mode: later callers outside it may write it.
        with torch.inference_mode(False):
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        _workspaces[key] = ws
    return ws


def plan_dispatch(ids: torch.Tensor, num_experts: int, pad: int = 1):
    """Reference of the device dispatch plan (any device, int32 outputs).

    Routed rows are grouped by expert in ascending id; inside an expert they keep the slot-major order
    of (slot, token) — a stable sort of ``ids.t().flatten()``, the order :meth:`ReferenceOps.moe`
    gathers tokens in. Ids outside ``[0, num_experts)`` are dropped (their row is -1).

    Returns:
        offsets ``[E + 1]``: expert e owns sorted rows ``offsets[e] .. offsets[e+1]-1``;
        row_of ``[N, k]``: the sorted row of (token, slot), or -1;
        row_expert ``[offsets[E]]``: the expert of each sorted row.
        With ``pad > 1`` (the contiguous expert GEMM's tiles) each expert's rows are padded to a multiple of pad
        (offsets are the padded starts, padding rows follow the real ones) and two more are returned:
        row_src ``[offsets[E]]`` (token * k + slot of each row, -1 for padding) and tile_expert
        ``[offsets[E] / pad]`` (the expert of each tile); the tile count is ``offsets[E] / pad``.
    """
    n, k = ids.shape
    flat = ids.t().reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    padded = (counts + pad - 1) // pad * pad
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(padded, 0)
    dense_start = torch.zeros_like(offsets)
    dense_start[1:] = torch.cumsum(counts, 0)
    sorted_expert = flat[order]
    rank = torch.arange(flat.numel(), device=ids.device)
    # Position in the padded layout: the expert's padded start + the rank inside the expert.
    in_expert = rank - dense_start[sorted_expert.clamp(max=num_experts - 1)]
    target = torch.where(key[order] < num_experts, offsets[sorted_expert.clamp(max=num_experts - 1)] + in_expert, -1)
    row = torch.empty_like(flat)
    row[order] = target
    row_of = row.view(k, n).t().contiguous()
    total = int(offsets[-1])
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=ids.device), padded)[:total]
    if pad == 1:
        return offsets.int(), row_of.int(), row_expert.int()
    src = (torch.arange(flat.numel(), device=ids.device) % n) * k + torch.arange(flat.numel(), device=ids.device) // n
    row_src = torch.full((total,), -1, dtype=torch.int64, device=ids.device)
    kept = row >= 0
    row_src[row[kept]] = src[kept]
    tile_expert = torch.repeat_interleave(torch.arange(num_experts, device=ids.device), padded // pad)
    return offsets.int(), row_of.int(), row_expert.int(), row_src.int(), tile_expert.int()


def route(x: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, expert_scale: torch.Tensor, top_k: int,
          eps: float, residual: tuple[torch.Tensor, torch.Tensor] | None = None):
    """MoE router on the GPU (same roundings as ``ReferenceOps.route``).

    Args:
        x: residual stream ``[N, hidden]`` bf16 (last dimension contiguous; hidden % 8 == 0).
        scale: ``[hidden]`` bf16; proj: ``[E, hidden]`` bf16 (E a multiple of 32, at most 256);
        expert_scale: ``[E]`` bf16; top_k: 1..16; eps: the RMSNorm epsilon.
        residual: ``(y [N, hidden], w [hidden])`` bf16 (x contiguous): the router first forms the layer's attention
            residual ``x + rms_norm(y) * w`` (bit-identical to the residual_norm kernel, same eps) and routes it.
    Returns:
        (weights fp32 ``[N, top_k]``, ids int32 ``[N, top_k]``), by descending probability; with ``residual``, also
        the new residual stream ``[N, hidden]``.
    """
    lib = _ext.require_cuda()
    n = x.shape[0]
    weights = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    if residual is None:
        lib.moe_route(x, scale, proj.contiguous(), expert_scale, int(top_k), float(eps), weights, ids,
                      _stream(x.device))
        return weights, ids
    y, w = residual
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lib.moe_route(x, scale, proj.contiguous(), expert_scale, int(top_k), float(eps), weights, ids, _stream(x.device),
                  y, w, out)
    return weights, ids, out


def plan(ids: torch.Tensor, num_experts: int, *,
         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, pad: int = 1, multi_block: bool = False):
    """The device dispatch plan of int32 ``ids`` ``[N, k]``: (offsets ``[E+1]``, row_of ``[N, k]``,
    row_expert ``[N*k]``), all int32, computed without a host synchronisation. Entries of row_expert
    past ``offsets[E]`` are left unwritten (undefined unless ``out`` was filled beforehand). See
    :func:`plan_dispatch` for the order. ``out``: optional preallocated (offsets, row_of, row_expert).
    With ``pad > 1``: (offsets, row_of, row_expert, row_src, tile_expert, num_tiles) of the padded plan, row_expert
    and row_src sized for the worst padding (``N*k + E*(pad-1)`` rows; entries past ``offsets[E]`` unwritten).
    ``multi_block``: give the kernel scratch so that a large input (over 4,096 entries) is planned on every SM, as
    the MoE layer plans it; the rows are the same."""
    lib = _ext.require_cuda()
    scratch = None
    if multi_block:
        need = lib.moe_plan_scratch_ints(ids.numel(), num_experts)
        scratch = torch.empty(max(need, 1), dtype=torch.int32, device=ids.device)
    if pad > 1:
        rows = ids.numel() + num_experts * (pad - 1)
        t = [torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device),
             torch.empty(ids.shape, dtype=torch.int32, device=ids.device),
             torch.empty(rows, dtype=torch.int32, device=ids.device),
             torch.empty(rows, dtype=torch.int32, device=ids.device),
             torch.empty((rows + pad - 1) // pad, dtype=torch.int32, device=ids.device),
             torch.empty(1, dtype=torch.int32, device=ids.device)]
        lib.moe_plan(ids, int(num_experts), t[0], t[1], t[2], _stream(ids.device), int(pad), t[3], t[4], t[5], scratch)
        return tuple(t)
    if out is None:
        offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
        row_of = torch.empty(ids.shape, dtype=torch.int32, device=ids.device)
        row_expert = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device)
    else:
        offsets, row_of, row_expert = out
    lib.moe_plan(ids, int(num_experts), offsets, row_of, row_expert, _stream(ids.device), scratch=scratch)
    return offsets, row_of, row_expert


class ExpertRows:
    """The contiguous expert pipeline's output before its combine (:func:`moe_fp8` with ``combine=False``): ``down``
    ``[rows, hidden]`` bf16 holds each (token, slot) row's scaled, weighted output and ``row_of`` ``[N, slots]`` int32
    its row (-1: none); slots ``[0, top_k)`` are the routed experts', the rest the shared experts' (the dense MLP).
    ``lead``: the leading shape of the tokens. Views of the pipeline's workspace: valid until the next
    :func:`moe_fp8` on the same stream, which :meth:`check` tells (the residual kernel that consumes them runs
    first in the model)."""

    __slots__ = ("down", "row_of", "top_k", "lead", "_key", "_generation")

    def __init__(self, down, row_of, top_k: int, lead: tuple[int, ...], key, generation: int | None):
        self.down, self.row_of, self.top_k, self.lead = down, row_of, top_k, lead
        self._key, self._generation = key, generation

    def check(self) -> None:
        if self._generation is not None and _generations.get(self._key) != self._generation:
            raise RuntimeError("these expert rows were overwritten by a later moe_fp8 call on the same stream; "
                               "consume them first")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense MLP branch, experts branch) ``[*lead, hidden]`` bf16: the combine's sums (slot order, fp32, one
        rounding), in torch."""
        self.check()
        rows = self.row_of.long()
        gathered = self.down[rows.clamp(min=0)].float() * (rows >= 0).unsqueeze(-1)
        sums = []
        for lo, hi in ((self.top_k, rows.shape[1]), (0, self.top_k)):
            acc = torch.zeros_like(gathered[:, 0])
            for k in range(lo, hi):
                acc = acc + gathered[:, k]
            sums.append(acc.bfloat16().view(*self.lead, -1))
        return sums[0], sums[1]


@functools.lru_cache(maxsize=4096)
def _rows_layout(tokens: int, slots: int, hidden: int, inter: int, experts: int, device: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in _ext.require_cuda().moe_fp8_workspace_layout(tokens, slots, hidden, inter, experts,
                                                                              device))


def moe_fp8(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: Fp8Weight, down: Fp8Weight, *,
            out: torch.Tensor | None = None, contiguous: bool | None = None, norm: torch.Tensor | None = None,
            eps: float = 1e-6, shared: int = 0, shared_norm: torch.Tensor | None = None,
            shared_out: torch.Tensor | None = None, combine: bool = True):
    """Routed experts with FP8 weights: ``sum_k weights[n,k] * down_e(gelu_tanh(gate_e x) * up_e x)``.

    Args:
        x: ``[N, hidden]`` bf16, contiguous (the pre-MoE-normed tokens).
        ids: ``[N, k]`` expert ids (int32 used as is; other integer dtypes are converted).
        weights: ``[N, k]`` routing weights (converted to fp32).
        gate_up: FP8 ``[E, 2*I, hidden]`` (gate rows first) with scales ``[E, 2*I]``.
        down: FP8 ``[E, hidden, I]`` with scales ``[E, hidden]``.
        out: optional ``[N, hidden]`` bf16 output.
        contiguous: the pipeline: True, one persistent GEMM per projection for all experts over a tile-padded
            expert-sorted layout (scales and routing weights in the GEMM epilogues); False, CUTLASS's pointer-array
            grouped GEMM; None (default): True unless ``DGEMMA_DISABLE_KERNELS`` names ``moe_contiguous``.
        norm, eps: when ``norm`` (``[hidden]`` bf16) is given the experts see ``rms_norm(x) * norm`` (the layer's
            pre-MoE norm, fused into the gather; the same values as normalising first).
        shared: the last ``shared`` experts of the stacks are shared experts (the dense MLP in expert-sized pieces,
            :class:`dgemma.weights.SharedExperts`): every token visits each with weight 1 after its routed slots
            (``ids`` name the others), on the contiguous pipeline; their sum per token is returned too.
        shared_norm: with ``norm``, the shared experts see ``rms_norm(x) * shared_norm`` (the MLP's pre-norm).
        shared_out: optional ``[N, hidden]`` bf16 output of the shared experts' sum.
        combine: False (contiguous pipeline): stop before the combine and return the rows as :class:`ExpertRows`
            (for :func:`dgemma.ops.cuda.ffn_residual_experts`, which sums them itself).
    Returns:
        ``out``, or ``(out, shared_out)`` with shared experts, or :class:`ExpertRows`; deterministic (fixed-order
        fp32 sums, no float atomics).
    """
    lib = _ext.require_cuda()
    n, hidden = x.shape
    e, two_i, _ = gate_up.q.shape
    ids = ids if ids.dtype == torch.int32 else ids.int()
    weights = weights if weights.dtype == torch.float32 else weights.float()
    if contiguous is None:
        contiguous = shared > 0 or not combine or "moe_contiguous" not in _ext.disabled_kernels()
    if combine and out is None:
        out = torch.empty(n, hidden, dtype=torch.bfloat16, device=x.device)
    if combine and shared > 0 and shared_out is None:
        shared_out = torch.empty(n, hidden, dtype=torch.bfloat16, device=x.device)
    slots = ids.shape[1] + max(int(shared), 0)
    device = _device_index(x.device)
    nbytes = _workspace_bytes("moe_fp8_workspace_bytes", n, slots, hidden, two_i // 2, e, device, bool(contiguous))
    ws = _workspace(x.device, nbytes)
    lib.moe_fp8(x, ids.contiguous(), weights.contiguous(), gate_up.q, gate_up.scale, down.q, down.scale, out, ws,
                _stream(x.device), bool(contiguous), norm, float(eps), int(shared), shared_norm, shared_out,
                bool(combine))
    if not combine:
        key = (x.device, _ext.current_stream(x.device))
        generation = None if torch.cuda.is_current_stream_capturing() else _generations.get(key)
        down_at, rows, row_of_at = _rows_layout(n, slots, hidden, two_i // 2, e, device)
        rows_view = ws[down_at:down_at + rows * hidden * 2].view(torch.bfloat16).view(rows, hidden)
        row_of = ws[row_of_at:row_of_at + n * slots * 4].view(torch.int32).view(n, slots)
        return ExpertRows(rows_view, row_of, int(ids.shape[1]), (n,), key, generation)
    return (out, shared_out) if shared > 0 else out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantisation on the GPU; bit-identical to :func:`dgemma.quant.quantize_rows`.

    Args:
        x: ``[rows, cols]`` bf16, cols a multiple of 16 and at most 8192.
    Returns:
        (q float8_e4m3fn ``[rows, cols]``, scale fp32 ``[rows]``).
    """
    lib = _ext.require_cuda()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lib.fp8_quantize_rows(x, q, scale, _stream(x.device))
    return q, scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 and x2.data_ptr() % 16 == 0 else x2.contiguous()


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> Fp8Rows:
    """The input of an FP8 GEMM in one kernel: ``rms_norm(x) [* weight]`` quantised per row, bit-identical to
    :func:`dgemma.ops.cuda.rms_norm` followed by :func:`quantize_rows` (and to the CPU reference of both).

    Args:
        x: ``[..., d]`` bf16 CUDA tensor, last dimension contiguous, rows evenly strided.
        weight: ``[d]`` bf16, or None for the weightless norm.
    """
    lib = _ext.require_cuda()
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    q = torch.empty(rows, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    lib.rms_norm_fp8(x, weight, q, scale, float(eps), _stream(x.device))
    return Fp8Rows(q, scale, tuple(x.shape[:-1]))


def _gemm_input(x: torch.Tensor | Fp8Rows) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """(x2, x_scale, leading shape) of a GEMM input: bf16 rows (quantised by the kernel) or :class:`Fp8Rows`."""
    if isinstance(x, Fp8Rows):
        return x.q, x.scale, x.lead
    return _rows(x), None, tuple(x.shape[:-1])


def linear_fp8(x: torch.Tensor | Fp8Rows, weight: Fp8Weight, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(weight)^T`` with FP8 operands in one GEMM launch (both scales in its epilogue, fp32
    accumulation, one rounding to bf16).

    Args:
        x: ``[..., in]`` bf16 (quantised per token first; in a multiple of 16, at most 8192), or
            :class:`~dgemma.quant.Fp8Rows` already quantised (e.g. by :func:`rms_norm_fp8`).
        weight: FP8 ``[out, in]`` (out a multiple of 8) with scales ``[out]``.
        out: optional contiguous ``[..., out]`` bf16.
    """
    lib = _ext.require_cuda()
    x2, x_scale, lead = _gemm_input(x)
    n_out, k = weight.q.shape
    if out is None:
        out = torch.empty(*lead, n_out, dtype=torch.bfloat16, device=x2.device)
    nbytes = _workspace_bytes("fp8_linear_workspace_bytes", x2.shape[0], n_out, k, _device_index(x2.device))
    lib.fp8_linear(x2, weight.q, weight.scale, out.view(-1, n_out), _workspace(x2.device, nbytes), _stream(x2.device),
                   x_scale)
    return out


def gated_mlp_fp8(x: torch.Tensor | Fp8Rows, gate: Fp8Weight, up: Fp8Weight, down: Fp8Weight, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``down(gelu_tanh(gate(x)) * up(x))`` with FP8 weights: the gate/up GEMM (one launch when ``up``'s rows
    follow ``gate``'s in memory, see :func:`dgemma.quant.fuse_rows`; else two), gelu·up with the re-quantisation
    of the intermediate in one kernel, the down GEMM; scales in the GEMMs' epilogues.

    Args:
        x: ``[..., hidden]`` bf16 or :class:`~dgemma.quant.Fp8Rows`; gate, up: FP8 ``[I, hidden]``;
            down: FP8 ``[hidden, I]``.
        out: optional contiguous ``[..., hidden]`` bf16.
    """
    lib = _ext.require_cuda()
    x2, x_scale, lead = _gemm_input(x)
    hidden = x2.shape[-1]
    inter = gate.q.shape[0]
    if out is None:
        out = torch.empty(*lead, hidden, dtype=torch.bfloat16, device=x2.device)
    nbytes = _workspace_bytes("fp8_gated_mlp_workspace_bytes", x2.shape[0], hidden, inter, _device_index(x2.device))
    lib.fp8_gated_mlp(x2, gate.q, gate.scale, up.q, up.scale, down.q, down.scale, out.view(-1, hidden),
                      _workspace(x2.device, nbytes), _stream(x2.device), x_scale)
    return out


@functools.lru_cache(maxsize=64)
def _route_supported(experts: int, top_k: int, hidden: int) -> bool:
    """Whether the router kernel takes these sizes (asked of the extension: its limits live there)."""
    return _ext.require_cuda().moe_route_unsupported(experts, top_k, hidden) == ""


def _kernel_ready(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and x.numel() > 0


def _dense_ready(x: torch.Tensor) -> bool:
    """The dense FP8 GEMM path applies (DGEMMA_DISABLE_KERNELS=fp8_dense: the reference ops, for triage)."""
    return _kernel_ready(x) and "fp8_dense" not in _ext.disabled_kernels()


def _experts_ready(x: torch.Tensor) -> bool:
    """The FP8 MoE pipeline applies (DGEMMA_DISABLE_KERNELS=fp8_moe: the reference experts, for triage)."""
    return _kernel_ready(x) and "fp8_moe" not in _ext.disabled_kernels()


def share_dense_mlp(layer) -> bool:
    """Lay ``layer``'s dense MLP out as shared experts of its expert stacks (:class:`dgemma.weights.SharedExperts`),
    so the MLP runs inside the expert GEMMs: the stacks gain ``intermediate / expert_intermediate`` pieces, the
    layer's experts become views of the stacks' heads and its ``mlp_*`` fields None (the originals are freed once
    nothing else holds them; the values are copied, never requantised). Needs FP8 weights throughout, a dense
    intermediate size that is a whole number of expert intermediates (as many as the extension's plan takes:
    _C.moe_shared_experts_unsupported), and one scale per dense down row
    (as per-channel quantisation gives). Returns whether it did (idempotent)."""
    from ..weights import SharedExperts

    if layer.shared_experts is not None:
        return True
    gate, up, down, gu, dn = layer.mlp_gate, layer.mlp_up, layer.mlp_down, layer.experts_gate_up, layer.experts_down
    if not all(isinstance(t, Fp8Weight) for t in (gate, up, down, gu, dn)) or gu.q.dim() != 3 or gate.q.dim() != 2:
        return False
    experts, two_i, hidden = gu.q.shape
    inter = two_i // 2
    if inter == 0 or gate.q.shape != up.q.shape or gate.q.shape[1] != hidden or down.q.shape[0] != hidden \
            or down.q.shape[1] != gate.q.shape[0] or gate.q.shape[0] % inter != 0:
        return False
    pieces = gate.q.shape[0] // inter
    if pieces < 1 or _ext.extension().moe_shared_experts_unsupported(experts + pieces, pieces):
        return False
    with torch.no_grad():
        q_gu = torch.cat([gu.q, torch.cat([gate.q.reshape(pieces, inter, hidden), up.q.reshape(pieces, inter, hidden)], 1)])
        s_gu = torch.cat([gu.scale, torch.cat([gate.scale.reshape(pieces, inter), up.scale.reshape(pieces, inter)], 1)])
        q_dn = torch.cat([dn.q, down.q.reshape(hidden, pieces, inter).permute(1, 0, 2)])
        s_dn = torch.cat([dn.scale, down.scale.expand(pieces, hidden)])
    stack_gu, stack_dn = Fp8Weight(q_gu, s_gu), Fp8Weight(q_dn, s_dn)
    layer.shared_experts = SharedExperts(Fp8Weight(q_gu[experts:], s_gu[experts:]),
                                         Fp8Weight(q_dn[experts:], s_dn[experts:]), stack_gu, stack_dn)
    layer.experts_gate_up = Fp8Weight(q_gu[:experts], s_gu[:experts])
    layer.experts_down = Fp8Weight(q_dn[:experts], s_dn[:experts])
    layer.mlp_gate = layer.mlp_up = layer.mlp_down = None
    return True


class Fp8MoeOpsMixin:
    """Overrides of ``linear``, ``gated_mlp``, ``route`` and ``moe`` that run the FP8/MoE kernels when
    their inputs fit (bf16 CUDA activations, FP8 weights) and defer to the next class otherwise.
    Use as ``class CudaOps(Fp8MoeOpsMixin, ReferenceOps)``."""

    def linear(self, x, weight):
        if isinstance(weight, Fp8Weight) and _dense_ready(x):
            return linear_fp8(x, weight)
        return super().linear(x, weight)

    def gated_mlp(self, x, gate, up, down):
        if all(isinstance(w, Fp8Weight) for w in (gate, up, down)) and _dense_ready(x):
            return gated_mlp_fp8(x, gate, up, down)
        return super().gated_mlp(x, gate, up, down)

    def norm_gated_mlp(self, x, norm, eps, gate, up, down):
        # The norm writes the GEMM's FP8 input directly (no bf16 round trip, one launch fewer).
        if all(isinstance(w, Fp8Weight) for w in (gate, up, down)) and _dense_ready(x) \
                and (norm is None or norm.dtype == torch.bfloat16) and "norm_quant" not in _ext.disabled_kernels():
            return gated_mlp_fp8(rms_norm_fp8(x, norm, eps), gate, up, down)
        return super().norm_gated_mlp(x, norm, eps, gate, up, down)

    def route(self, x, scale, proj, expert_scale, top_k, eps):
        if _kernel_ready(x) and proj.dtype == torch.bfloat16 and _route_supported(proj.shape[0], top_k, x.shape[-1]):
            return route(x, scale, proj, expert_scale, top_k, eps)
        return super().route(x, scale, proj, expert_scale, top_k, eps)

    def moe(self, x, ids, weights, gate_up, down):
        if isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight) and _experts_ready(x):
            return moe_fp8(x.contiguous(), ids, weights, gate_up, down)
        return super().moe(x, ids, weights, gate_up, down)

    def residual_ffn(self, x, y, weight, eps, w, top_k, tokens_per_row=None):
        # The dense MLP as shared experts (share_dense_mlp): the residual kernel, the router, and one expert pipeline
        # for the MLP and the experts together (each routed or shared row is computed on its own, so independent
        # sequences need nothing more). Elsewhere (or switched off) the reference composition of the ops, on the
        # MLP reassembled from its pieces.
        sh = w.shared_experts
        if sh is None or not _experts_ready(x) or not x.is_contiguous() \
                or {"shared_experts", "moe_contiguous", "norm_quant", "fp8_dense"} & _ext.disabled_kernels() \
                or w.pre_ff_norm.dtype != torch.bfloat16 or w.pre_moe_norm.dtype != torch.bfloat16:
            return super().residual_ffn(x, y, weight, eps, w, top_k, tokens_per_row)
        hidden = x.shape[-1]
        router = (w.router_scale, w.router_proj, w.router_expert_scale, top_k, eps)
        if y.shape == x.shape and y.dtype == weight.dtype == torch.bfloat16 and w.router_proj.dtype == torch.bfloat16 \
                and _route_supported(w.router_proj.shape[0], top_k, hidden) \
                and "residual_norm" not in _ext.disabled_kernels():
            # The router forms and stores the attention residual itself (one launch fewer).
            weights, ids, flat = route(x.view(-1, hidden), *router, residual=(y.contiguous().view(-1, hidden), weight))
            x = flat.view_as(x)
        else:
            x = self.add_rms_norm(x, y, weight, eps)
            flat = x.view(-1, hidden)
            weights, ids = self.route(flat, *router)
        # The rows stay unsummed: the feed-forward residual kernel that follows sums both branches itself
        # (ffn_residual / ffn_residual_qkv take ExpertRows; anything else gets tensors from ExpertRows.tensors()).
        rows = moe_fp8(flat, ids, weights, sh.stack_gate_up, sh.stack_down, norm=w.pre_moe_norm, eps=eps,
                       shared=sh.shared, shared_norm=w.pre_ff_norm, combine=False)
        rows.lead = tuple(x.shape[:-1])
        return x, rows, rows

    def norm_moe(self, x, norm, eps, ids, weights, gate_up, down, tokens_per_row=None):
        # The pre-MoE norm inside the experts' gather (one launch fewer, no bf16 round trip). Every routed row is
        # computed on its own, so independent sequences (tokens_per_row) need nothing more.
        if isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight) and _experts_ready(x) \
                and norm is not None and norm.dtype == torch.bfloat16 and "norm_quant" not in _ext.disabled_kernels():
            return moe_fp8(x.contiguous(), ids, weights, gate_up, down, norm=norm, eps=eps)
        return super().norm_moe(x, norm, eps, ids, weights, gate_up, down, tokens_per_row)

    def moe_rows(self, x, ids, weights, gate_up, down, tokens_per_row):
        # The kernel computes every routed row on its own (per-token scales, fixed-order sums): one call for
        # all sequences gives each the result it would have alone.
        if isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight) and _experts_ready(x):
            return moe_fp8(x.contiguous(), ids, weights, gate_up, down)
        return super().moe_rows(x, ids, weights, gate_up, down, tokens_per_row)
