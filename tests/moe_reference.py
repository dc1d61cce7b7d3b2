"""References for the FP8/MoE kernel tests (any device; CPU for their own unit checks).

The FP8 references quantise exactly where and how the kernels do, so the kernels can be held to a tight
bound; what remains is accumulation order (the FP8 tensor-core accumulator) and the ulp-level
differences that follow from it:

* activations: one fp32 scale per token, ``scale = max(amax, 1e-12) / 448`` (IEEE division),
  ``q = e4m3_rne(clamp(x / scale, ±448))`` — :func:`dgemma.quant.quantize_rows`, bit-exact with the
  kernels' quantiser (csrc/kernels/fp8_quant.cuh);
* weights: the stored per-output-channel scales of :class:`~dgemma.quant.Fp8Weight`;
* an expert GEMM is the *unscaled* product of the E4M3 values, accumulated (here exactly, in fp64) and
  rounded to bf16, as the CUTLASS grouped GEMM writes it (csrc/kernels/sm90_fp8_grouped_gemm.cuh); its
  consumer applies ``(d * a_scale) * w_scale`` in fp32 (csrc/kernels/fp8_epilogue.cuh,
  csrc/kernels/moe_dispatch.cuh), the intermediate ``gelu_tanh(gate) * up`` is computed in fp32 from the
  scaled halves and re-quantised per row before the down GEMM, and the MoE output sums the slots in slot
  order in fp32 and rounds once to bf16;
* a dense GEMM (fp8_linear, fp8_gated_mlp: csrc/kernels/sm90_fp8_scaled_gemm.cuh) applies both scales to the
  fp32 product in its epilogue and rounds once to bf16 (dgemma.quant.scaled_gemm_reference).

The router reference follows csrc/kernels/moe_route.cuh: bf16 roundings of the reference router, NaN
logits as -inf, and among equal probabilities the lowest expert id first.
"""

from __future__ import annotations

import torch

from dgemma import quant
from dgemma.quant import Fp8Weight, quantize_rows

# -- error measures --------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``||out - ref|| / ||ref||`` (fp64)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity measure ``1 - 2 sum(x y) / sum(x² + y²)`` in fp64 (0 when x == y)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom.item() == 0:
        return 0.0
    return (1 - 2 * (x * y).sum() / denom).item()


# -- FP8 GEMM pipelines ----------------------------------------------------------------------------


gelu_tanh = quant.gelu_tanh_reference


def fp8_gemm(aq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Unscaled ``aq [m, k] . wq [n, k]^T`` of E4M3 values as the GEMM stores it: rounded to bf16
    (returned as fp32). Products of E4M3 values and their sums are exact in fp64, so this is the
    correctly rounded result; the kernel's fp32 tensor-core accumulation differs by its rounding."""
    return (aq.double() @ wq.double().t()).float().bfloat16().float()


def gelu_up_quantize(gate: torch.Tensor, up: torch.Tensor, a_scale: torch.Tensor, gate_scale: torch.Tensor,
                     up_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The intermediate of an FP8 MLP/expert: ``h = gelu_tanh(gate * as * gs) * (up * as * us)`` in fp32
    from the unscaled bf16 GEMM halves, re-quantised per row (fp8_epilogue.cuh gelu_up_quantize)."""
    a = a_scale[:, None]
    h = gelu_tanh(gate * a * gate_scale[None, :]) * (up * a * up_scale[None, :])
    return quantize_rows(h)


# The dense kernels' references live with the quantisation scheme (dgemma.quant), shared with the benchmarks.
linear_fp8 = quant.linear_reference
gated_mlp_fp8 = quant.gated_mlp_reference


def _moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: Fp8Weight, down: Fp8Weight,
         expert) -> torch.Tensor:
    """The frame both MoE references share: each token quantised once; for every valid expert e,
    ``expert(e, xq_rows, xs_rows, routing_weights) -> [rows, hidden]`` gives the fp32 contributions of its (token,
    slot) rows; the combine sums the slots in slot order in fp32 and rounds once to bf16. Ids outside ``[0, E)``
    contribute nothing."""
    n, hidden = x.shape
    top_k = ids.shape[1]
    experts = gate_up.q.shape[0]
    ids = ids.long()
    weights = weights.float()
    xq, xs = quantize_rows(x)
    contrib = torch.zeros(top_k, n, hidden, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < experts:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        contrib[slot, tok] = expert(e, xq[tok], xs[tok], weights[tok, slot])
    out = torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    for k in range(top_k):  # the combine kernel's slot order
        out = out + contrib[k]
    return out.bfloat16()


def moe_fp8(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: Fp8Weight,
            down: Fp8Weight) -> torch.Tensor:
    """``moe_fp8`` on the pointer-array pipeline: ``out[t] = bf16(sum_k (w[t,k] * hs) * ws[e] * d_e[t,k])`` summed in
    slot order, where expert e = ids[t, k] computes the unscaled gate_up (bf16), gelu·up (scaled in fp32,
    re-quantised per (token, slot) row) and the unscaled down (bf16)."""
    inter = gate_up.q.shape[1] // 2

    def expert(e, xq, xs, w):
        d1 = fp8_gemm(xq, gate_up.q[e])
        hq, hs = gelu_up_quantize(d1[:, :inter], d1[:, inter:], xs, gate_up.scale[e, :inter],
                                  gate_up.scale[e, inter:])
        return ((w * hs)[:, None] * down.scale[e][None, :]) * fp8_gemm(hq, down.q[e])

    return _moe(x, ids, weights, gate_up, down, expert)


def moe_fp8_contiguous(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: Fp8Weight,
                       down: Fp8Weight) -> torch.Tensor:
    """``moe_fp8`` on the contiguous pipeline (sm90_moe_grouped_gemm.cuh): the gate_up GEMM's epilogue scales by
    the token's and the channel's scales and rounds to bf16; gelu·up in fp32, re-quantised per (token, slot) row; the
    down GEMM's epilogue scales by that row's scale times its routing weight and the channel's scale and rounds to
    bf16."""
    inter = gate_up.q.shape[1] // 2

    def expert(e, xq, xs, w):
        gate = Fp8Weight(gate_up.q[e, :inter], gate_up.scale[e, :inter])
        up = Fp8Weight(gate_up.q[e, inter:], gate_up.scale[e, inter:])
        g, u = (quant.scaled_gemm_reference(xq, xs, p).float() for p in (gate, up))
        hq, hs = quantize_rows(gelu_tanh(g) * u)
        return quant.scaled_gemm_reference(hq, hs * w, Fp8Weight(down.q[e], down.scale[e])).float()

    return _moe(x, ids, weights, gate_up, down, expert)


def moe_fp8_shared(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: Fp8Weight, down: Fp8Weight,
                   shared: int, norm: torch.Tensor | None = None, shared_norm: torch.Tensor | None = None,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_fp8(..., shared=shared)`` (contiguous pipeline): (routed out, shared out). The last ``shared`` experts
    of the stacks are visited by every token with weight 1 after its routed slots and summed on their own; ids name
    only the routed experts (others are dropped). With ``norm`` the routed rows see rms_norm(x)·norm and the shared
    rows rms_norm(x)·shared_norm (each quantised per token), the norm as the reference ops compute it."""
    from dgemma.ops.reference import ReferenceOps

    experts = gate_up.q.shape[0]
    routed = experts - shared
    ids = torch.where((ids >= 0) & (ids < routed), ids.long(), torch.full_like(ids.long(), -1))
    ops = ReferenceOps()
    xr = x if norm is None else ops.rms_norm(x, norm, eps)
    xs = x if norm is None else ops.rms_norm(x, shared_norm, eps)
    n = x.shape[0]
    shared_ids = torch.arange(routed, experts, device=x.device).expand(n, shared)
    ones = torch.ones(n, shared, dtype=torch.float32, device=x.device)
    return (moe_fp8_contiguous(xr, ids, weights, gate_up, down),
            moe_fp8_contiguous(xs, shared_ids, ones, gate_up, down))


# -- router ----------------------------------------------------------------------------------------


def route_logits(x: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, eps: float) -> torch.Tensor:
    """The router's bf16-rounded logits [N, E] (as fp32), with the kernel's roundings:
    h = bf16(bf16(bf16(x * rms^-1) * scale) * hidden^-1/2), logits = bf16(h . proj[e]) (exact sum here)."""
    hidden = x.shape[-1]
    xf = x.float()
    ss = (xf * xf).sum(-1, keepdim=True)
    inv_rms = torch.rsqrt(ss / torch.full_like(ss, hidden) + eps)  # IEEE division, as the kernel's
    h = (xf * inv_rms).bfloat16().float()
    h = (h * scale.float()).bfloat16().float()
    h = (h * torch.tensor(hidden ** -0.5, dtype=torch.float32)).bfloat16()
    return (h.double() @ proj.double().t()).float().bfloat16().float()


def route_from_logits(logits: torch.Tensor, expert_scale: torch.Tensor,
                      top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [N, k], ids int64 [N, k]) from router logits, by descending probability.

    NaN logits count as -inf; a logit equal to the row max has numerator exactly 1 (a row of all
    NaN/-inf is uniform); among equal probabilities the lowest expert id comes first."""
    l = torch.where(torch.isnan(logits), torch.full_like(logits, float("-inf")), logits.float())
    m = l.amax(-1, keepdim=True)
    num = torch.where(l == m, torch.ones_like(l), torch.exp(l - m))
    p = num * (1.0 / num.sum(-1, keepdim=True))
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)  # stable: lowest id first
    top_p, ids = p_sorted[:, :top_k], order[:, :top_k]
    total = torch.zeros_like(top_p[:, 0])
    for k in range(top_k):  # the kernel's sequential sum
        total = total + top_p[:, k]
    return top_p / total[:, None] * expert_scale.float()[ids], ids


def route(x: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, expert_scale: torch.Tensor, top_k: int,
          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, ids, logits) of the router reference."""
    logits = route_logits(x, scale, proj, eps)
    w, ids = route_from_logits(logits, expert_scale, top_k)
    return w, ids, logits


def dense_routing(ids: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    """The routing as a dense fp32 [N, E] matrix (0 where an expert is not chosen): independent of the
    order of the k slots and of which of several equal-probability experts came first in a list."""
    dense = torch.zeros(ids.shape[0], experts, dtype=torch.float32, device=ids.device)
    return dense.scatter_(1, ids.long(), weights.float())


def near_tie_tolerance(logit: torch.Tensor) -> torch.Tensor:
    """Two bf16 ulps of a logit (bf16 keeps 8 significant bits): how far the kernel's fp32 sum, rounded
    to bf16, may be from the reference's exactly rounded one."""
    return logit.abs() * 2.0 ** -6 + 1e-6
