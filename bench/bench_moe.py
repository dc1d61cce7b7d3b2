"""FP8 MoE layer and FP8 dense GEMMs vs their rooflines, with a torch bf16 grouped-matmul baseline.

    python bench/bench_moe.py --out bench/results/moe.json

Real shapes: hidden 2816, 128 experts, top-8, expert intermediate 704. "tokens" are rows of the
residual stream (256 = one canvas at batch 1 -> 2048 routed rows, ~16 per expert). The MoE layer timed
is router + pre-MoE RMSNorm + experts (dispatch, two grouped GEMMs, gelu·up, combine). Roofline: the
FP8 expert weights touched (plus scales, router, activations) at 3.02 TB/s, or the FLOPs at the FP8
peak, whichever is larger. Targets (H100): 0.30 ms at 256 tokens, 0.34 ms at 1024 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import FP8_FLOPS, median, roofline_ms, time_cuda, write_results  # noqa: E402

from dgemma import quant  # noqa: E402
from dgemma.ops import cuda_moe  # noqa: E402
from dgemma.ops.reference import ReferenceOps  # noqa: E402
from dgemma.quant import quantize_weight  # noqa: E402

H, I, E, K = 2816, 704, 128, 8
TARGET_MS = {256: 0.30, 1024: 0.34}
BF16 = torch.bfloat16


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Layer:
    """Random MoE-layer weights: bf16 originals (for the baseline) and their FP8 quantisation."""

    def __init__(self, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.gate_up_bf16 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H ** -0.5).to(BF16)
        self.down_bf16 = (torch.randn(E, H, I, device="cuda", generator=g) * I ** -0.5).to(BF16)
        self.gate_up = quantize_weight(self.gate_up_bf16)
        self.down = quantize_weight(self.down_bf16)
        self.proj = (torch.randn(E, H, device="cuda", generator=g) * H ** -0.5 * 4).to(BF16)
        self.router_scale = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(BF16)
        self.expert_scale = (1 + 0.1 * torch.rand(E, device="cuda", generator=g)).to(BF16)
        self.norm = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(BF16)


def moe_layer_fp8(layer: Layer, x: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
    from dgemma.ops.cuda import rms_norm

    weights, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
    return cuda_moe.moe_fp8(rms_norm(x, layer.norm, 1e-6), ids, weights, layer.gate_up, layer.down,
                            contiguous=contiguous)


def moe_layer_bf16_grouped(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The same layer in torch bf16: reference router, argsort dispatch, torch._grouped_mm experts."""
    ops = ReferenceOps()
    weights, ids = ops.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
    h = ops.rms_norm(x, layer.norm, 1e-6)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).int()
    rows = h[order // K]
    gu = torch._grouped_mm(rows, layer.gate_up_bf16.transpose(-2, -1), offs=offs)
    act = F.gelu(gu[:, :I], approximate="tanh") * gu[:, I:]
    y = torch._grouped_mm(act, layer.down_bf16.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(BF16)
    return torch.zeros_like(x).index_add_(0, order // K, y)


def router_cases(layer: Layer, token_counts, iters: int) -> list[dict]:
    """Router + top-k + dispatch plan (row ``moe_route_t<n>``; the router's tile from DGEMMA_ROUTE_TILE, one per
    process: sweep by running this again), its roofline the proj and token bytes, and the share of tokens
    routed to the reference router's experts."""
    tile = os.environ.get("DGEMMA_ROUTE_TILE", "default")
    results = []
    for n in token_counts:
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(n, H, device="cuda", generator=g).to(BF16)
        weights, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
        _, ref_ids = ReferenceOps().route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
        same = float((ids.long().sort(-1).values == ref_ids.sort(-1).values).all(-1).float().mean())
        def route_and_plan():
            _, i = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
            return cuda_moe.plan(i, E)

        ms = median(time_cuda(route_and_plan, iters=iters))
        roof = roofline_ms(E * H * 2 + n * H * 2 + n * K * 8, 2 * n * E * H)
        results.append(dict(name=f"moe_route_t{n}", median_ms=ms, roofline_ms=roof, tokens=n, route_tile=tile,
                            what="router + top-k + dispatch plan", rows_with_reference_experts=same,
                            roofline_share=roof / ms))
    return results


def moe_cases(layer: Layer, token_counts, iters: int) -> list[dict]:
    results = []
    expert_bytes = 2 * I * H + H * I + 4 * (2 * I + H)  # FP8 weights + fp32 scales of one expert
    for n in token_counts:
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(n, H, device="cuda", generator=g).to(BF16)
        weights, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
        touched = int(torch.unique(ids).numel())
        bytes_moved = touched * expert_bytes + E * H * 2 + 3 * n * H * 2
        flops = 2 * n * K * (2 * I * H + I * H)
        roof = roofline_ms(bytes_moved, flops, FP8_FLOPS)

        h = ReferenceOps().rms_norm(x, layer.norm, 1e-6)
        out = cuda_moe.moe_fp8(h, ids, weights, layer.gate_up, layer.down)
        ref = ReferenceOps().moe(h.float(), ids.long(), weights, layer.gate_up, layer.down)
        err = rel_err(out, ref)
        ms = median(time_cuda(lambda: moe_layer_fp8(layer, x), iters=iters))
        # NOTE: rel_err_fp32 is the end-to-end FP8 error (against fp32 on dequantised weights); the FP8-faithful
        # comparison of the experts is tests/test_moe_cuda.py's.
        results.append(dict(name=f"moe_layer_fp8_t{n}", median_ms=ms, roofline_ms=roof, roofline_share=roof / ms,
                            rel_err_fp32=err, target_ms=TARGET_MS.get(n, float("nan")), tokens=n, routed_rows=n * K,
                            experts_touched=touched, pipeline="contiguous"))
        # The pointer-array grouped GEMM pipeline (DGEMMA_DISABLE_KERNELS=moe_contiguous), same layer, same run.
        out = cuda_moe.moe_fp8(h, ids, weights, layer.gate_up, layer.down, contiguous=False)
        ptr = median(time_cuda(lambda: moe_layer_fp8(layer, x, contiguous=False), iters=iters))
        results.append(dict(name=f"moe_layer_fp8_ptr_array_t{n}", median_ms=ptr, roofline_ms=roof,
                            roofline_share=roof / ptr, rel_err_fp32=rel_err(out, ref), tokens=n,
                            pipeline="ptr_array", contiguous_speedup=ptr / ms))
        try:
            base = median(time_cuda(lambda: moe_layer_bf16_grouped(layer, x), iters=iters))
            base_roof = roofline_ms(touched * 3 * I * H * 2 + E * H * 2 + 3 * n * H * 2, flops)
            results.append(dict(name=f"moe_layer_bf16_grouped_mm_t{n}", median_ms=base, roofline_ms=base_roof,
                                tokens=n, fp8_speedup=base / ms))
        except (RuntimeError, AttributeError) as e:  # torch._grouped_mm missing or unsupported here
            print(f"bf16 grouped_mm baseline skipped at {n} tokens: {e}")
    return results


DENSE_I = 2112  # the dense MLP's intermediate: 3 expert intermediates


def ffn_cases(layer: Layer, token_counts, iters: int) -> list[dict]:
    """A layer's whole feed-forward block as the model runs it on the CUDA backend: router + the experts and the
    dense MLP (3 shared experts) in one expert pipeline (``ffn_fp8_shared_t<n>``), and, in the same run, the
    router + experts + the dense MLP on its own GEMMs (``ffn_fp8_separate_t<n>``, DGEMMA_DISABLE_KERNELS=
    shared_experts). Roofline: the experts touched, the dense MLP, the router and the activations."""
    from types import SimpleNamespace

    from dgemma.ops.cuda import rms_norm_fp8

    g = torch.Generator(device="cuda").manual_seed(99)
    dense = [quantize_weight((torch.randn(*shape, device="cuda", generator=g) * shape[1] ** -0.5).to(BF16))
             for shape in ((DENSE_I, H), (DENSE_I, H), (H, DENSE_I))]
    lw = SimpleNamespace(mlp_gate=dense[0], mlp_up=dense[1], mlp_down=dense[2], experts_gate_up=layer.gate_up,
                         experts_down=layer.down, shared_experts=None)
    assert cuda_moe.share_dense_mlp(lw)
    sh = lw.shared_experts
    gate, up, down = sh.dense()
    gate, up = quant.fuse_rows([gate, up])[1]  # adjacent rows: gate/up as one GEMM, as the model would run them
    mlp_norm = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(BF16)
    expert_bytes = 2 * I * H + H * I + 4 * (2 * I + H)
    results = []
    for n in token_counts:
        x = torch.randn(n, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(n)).to(BF16)

        def shared():
            weights, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
            return cuda_moe.moe_fp8(x, ids, weights, sh.stack_gate_up, sh.stack_down, norm=layer.norm, eps=1e-6,
                                    shared=sh.shared, shared_norm=mlp_norm)

        def separate():
            weights, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
            moe = cuda_moe.moe_fp8(x, ids, weights, layer.gate_up, layer.down, norm=layer.norm, eps=1e-6)
            return moe, cuda_moe.gated_mlp_fp8(rms_norm_fp8(x, mlp_norm, 1e-6), gate, up, down)

        (moe_a, mlp_a), (moe_b, mlp_b) = shared(), separate()
        _, ids = cuda_moe.route(x, layer.router_scale, layer.proj, layer.expert_scale, K, 1e-6)
        touched = int(torch.unique(ids).numel())
        bytes_moved = (touched * expert_bytes + 3 * DENSE_I * H + 4 * (3 * DENSE_I + H) + E * H * 2 + 4 * n * H * 2)
        flops = 2 * n * (K * 3 * I * H + 3 * DENSE_I * H)
        roof = roofline_ms(bytes_moved, flops, FP8_FLOPS)
        ms_shared = median(time_cuda(shared, iters=iters))
        ms_separate = median(time_cuda(separate, iters=iters))
        # The two layouts quantise the MLP's intermediate differently (per piece vs per token): their gap is FP8
        # noise, reported, not a correctness bound (tests/test_moe_cuda.py holds each to its own reference).
        results.append(dict(name=f"ffn_fp8_shared_t{n}", median_ms=ms_shared, roofline_ms=roof,
                            roofline_share=roof / ms_shared, tokens=n, experts_touched=touched,
                            moe_vs_separate=rel_err(moe_a, moe_b), mlp_vs_separate=rel_err(mlp_a, mlp_b),
                            speedup_vs_separate=ms_separate / ms_shared))
        results.append(dict(name=f"ffn_fp8_separate_t{n}", median_ms=ms_separate, roofline_ms=roof,
                            roofline_share=roof / ms_separate, tokens=n))
    return results


# (name, out_features, in_features): DiffusionGemma 26B-A4B's attention projections.
LINEAR_SHAPES = [("q_proj_sliding", 4096, 2816), ("kv_proj_sliding", 2048, 2816), ("o_proj_sliding", 2816, 4096),
                 ("q_proj_full", 8192, 2816), ("k_proj_full", 1024, 2816), ("o_proj_full", 2816, 8192)]


# q/k/v as the model runs them: one weight per layer kind (sliding: q 4096 + k 2048 + v 2048; full: q 8192 + k 1024,
# V = K), its input written by the input norm (rms_norm_fp8).
QKV_SHAPES = [("sliding", 8192, 2816), ("full", 9216, 2816)]


def _dense_row(name: str, ms: float, roof: float, err: float, **extra) -> dict:
    return dict(name=name, median_ms=ms, roofline_ms=roof, roofline_share=roof / ms, rel_err=err, **extra)


def dense_cases(rows_list, iters: int) -> list[dict]:
    """The dense FP8 GEMMs as the model calls them. rel_err: against the FP8-faithful reference
    (dgemma.quant.*_reference: the same quantisation, exact products); rel_err_fp32: against fp32 on the
    dequantised weights (the FP8 error itself)."""
    from dgemma.ops.cuda import rms_norm

    results = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for rows in rows_list:
        x = torch.randn(rows, 8192, device="cuda", generator=g).to(BF16)
        for name, n_out, k in LINEAR_SHAPES:
            w = quantize_weight((torch.randn(n_out, k, device="cuda", generator=g) * k ** -0.5).to(BF16))
            xi = x[:, :k].contiguous()
            out = cuda_moe.linear_fp8(xi, w)
            ms = median(time_cuda(lambda: cuda_moe.linear_fp8(xi, w), iters=iters))
            roof = roofline_ms(n_out * k + 4 * n_out + rows * k * 2 + rows * n_out * 2, 2 * rows * n_out * k, FP8_FLOPS)
            results.append(_dense_row(f"fp8_linear_{name}_r{rows}", ms, roof, rel_err(out, quant.linear_reference(xi, w)),
                                      rel_err_fp32=rel_err(out, xi.float() @ w.dequantize().t()), rows=rows, n=n_out,
                                      k=k))
        norm = (torch.rand(H, device="cuda", generator=g) + 0.5).to(BF16)
        xh = x[:, :H].contiguous()
        for kind, n_out, k in QKV_SHAPES:
            w = quantize_weight((torch.randn(n_out, k, device="cuda", generator=g) * k ** -0.5).to(BF16))

            def qkv():
                return cuda_moe.linear_fp8(cuda_moe.rms_norm_fp8(xh, norm, 1e-6), w)

            out, normed = qkv(), rms_norm(xh, norm, 1e-6)
            ms = median(time_cuda(qkv, iters=iters))
            roof = roofline_ms(n_out * k + 4 * n_out + rows * k * 2 + rows * n_out * 2, 2 * rows * n_out * k, FP8_FLOPS)
            results.append(_dense_row(f"fp8_qkv_{kind}_r{rows}", ms, roof, rel_err(out, quant.linear_reference(normed, w)),
                                      rel_err_fp32=rel_err(out, normed.float() @ w.dequantize().t()), rows=rows,
                                      n=n_out, k=k, launches="rms_norm_fp8 + GEMM"))
        inter = 2112
        parts = [quantize_weight((torch.randn(inter, H, device="cuda", generator=g) * H ** -0.5).to(BF16))
                 for _ in range(2)]
        _, (gate, up) = quant.fuse_rows(parts)  # stacked as the CUDA backend stores them: one gate/up GEMM
        down = quantize_weight((torch.randn(H, inter, device="cuda", generator=g) * inter ** -0.5).to(BF16))
        out = cuda_moe.gated_mlp_fp8(xh, gate, up, down)
        ms = median(time_cuda(lambda: cuda_moe.gated_mlp_fp8(xh, gate, up, down), iters=iters))
        roof = roofline_ms(3 * inter * H + rows * H * 4, 2 * rows * 3 * inter * H, FP8_FLOPS)
        results.append(_dense_row(f"fp8_gated_mlp_r{rows}", ms, roof,
                                  rel_err(out, quant.gated_mlp_reference(xh, gate, up, down)),
                                  rel_err_fp32=rel_err(out, ReferenceOps().gated_mlp(xh.float(), gate, up, down)),
                                  rows=rows, hidden=H, inter=inter))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--iters", type=int, default=30, help="timed calls per case (median reported; >= 20)")
    p.add_argument("--tokens", default="256,1024", help="MoE token counts, comma-separated")
    p.add_argument("--rows", default="256,1024", help="dense GEMM row counts, comma-separated")
    p.add_argument("--router-only", action="store_true", help="time only the router (for DGEMMA_ROUTE_TILE sweeps)")
    p.add_argument("--moe-only", action="store_true",
                   help="time only the MoE layer, both pipelines (for DGEMMA_MOE_TILE sweeps of the expert GEMM tile)")
    p.add_argument("--dense-only", action="store_true",
                   help="time only the dense FP8 GEMMs (for DGEMMA_DENSE_CLUSTER sweeps)")
    args = p.parse_args(argv)
    if args.moe_only + args.router_only + args.dense_only > 1:
        p.error("--router-only, --moe-only and --dense-only exclude each other")
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device; nothing to measure")
        return 1
    if args.dense_only:
        results = dense_cases([int(r) for r in args.rows.split(",")], args.iters)
        for r in results:
            r["dense_cluster"] = os.environ.get("DGEMMA_DENSE_CLUSTER", "off")
        write_results(args.out, results)
        return 0
    layer = Layer()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.moe_only:
        results = moe_cases(layer, tokens, args.iters)
        for r in results:
            r["moe_tile"] = os.environ.get("DGEMMA_MOE_TILE", "auto")
        write_results(args.out, results)
        return 0
    results = router_cases(layer, tokens, args.iters)
    if args.router_only:
        write_results(args.out, results)
        return 0
    results += moe_cases(layer, tokens, args.iters)
    results += ffn_cases(layer, tokens, args.iters)
    del layer
    torch.cuda.empty_cache()
    results += dense_cases([int(r) for r in args.rows.split(",")], args.iters)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
