"""The CUDA backend's Python orchestration of a layer's feed-forward block, run on the CPU against a stand-in for
``dgemma._C`` whose entry points compute with the reference ops: the dense MLP as shared experts, the router that
forms the attention residual, the expert pipeline stopped before its combine (ExpertRows over the workspace layout)
and the residual kernel that sums the rows and writes the next layer's FP8 input. The kernels themselves are tested
on the GPU (tests/test_moe_cuda.py); this holds the glue to the same results as the reference ops and checks that it
passes each entry point the arguments its binding takes."""

from __future__ import annotations

import inspect

import pytest
import torch

from dgemma import _ext, quant
from dgemma.ops import ReferenceOps, cuda, cuda_moe
from dgemma.random_checkpoint import random_engine

REF = ReferenceOps()


def _align(n: int) -> int:
    return (n + 255) // 256 * 256


class StandInC:
    """The entry points the feed-forward block reaches, with the bindings' parameter names, computed by the
    reference ops (rows of the expert pipeline unpadded: row of (token, slot) = token * slots + slot)."""

    def __init__(self):
        self.calls: list[str] = []

    def moe_route_unsupported(self, experts, top_k, hidden):
        return ""

    def attention_head_dim_supported(self, head_dim):
        return True

    def moe_route(self, x, scale, proj, expert_scale, top_k, eps, weights, ids, stream, residual_y=None,
                  residual_w=None, residual_out=None):
        self.calls.append("moe_route" + ("+residual" if residual_y is not None else ""))
        if residual_y is not None:
            residual_out.copy_(REF.add_rms_norm(x, residual_y, residual_w, eps))
            x = residual_out
        w, i = REF.route(x, scale, proj, expert_scale, top_k, eps)
        weights.copy_(w)
        ids.copy_(i)

    def moe_fp8_workspace_bytes(self, tokens, top_k, hidden, inter, experts, device, contiguous=True):
        return _align(tokens * top_k * hidden * 2) + _align(tokens * top_k * 4)

    def moe_fp8_workspace_layout(self, tokens, slots, hidden, inter, experts, device):
        return 0, tokens * slots, _align(tokens * slots * hidden * 2)

    def moe_fp8(self, x, ids, weights, gate_up_q, gate_up_scale, down_q, down_scale, out, workspace, stream,
                contiguous=True, norm=None, eps=1e-6, shared=0, shared_norm=None, shared_out=None, combine=True):
        self.calls.append(f"moe_fp8(shared={shared}, combine={combine})")
        n, hidden = x.shape
        top_k, experts = ids.shape[1], gate_up_q.shape[0]
        slots = top_k + shared
        gu = quant.Fp8Weight(gate_up_q, gate_up_scale).dequantize()
        dn = quant.Fp8Weight(down_q, down_scale).dequantize()
        inter = gu.shape[1] // 2
        routed_in = x if norm is None else REF.rms_norm(x, norm, eps)
        shared_in = x if norm is None else REF.rms_norm(x, shared_norm, eps)
        rows = torch.zeros(n, slots, hidden)
        for t in range(n):
            for k in range(slots):
                e = int(ids[t, k]) if k < top_k else experts - shared + k - top_k
                h = (routed_in if k < top_k else shared_in)[t].float()
                g, u = gu[e, :inter] @ h, gu[e, inter:] @ h
                rows[t, k] = (dn[e] @ (quant.gelu_tanh_reference(g) * u)) * (float(weights[t, k]) if k < top_k else 1.0)
        rows = rows.bfloat16()
        if combine:
            out.copy_(rows[:, :top_k].float().sum(1).bfloat16())
            if shared:
                shared_out.copy_(rows[:, top_k:].float().sum(1).bfloat16())
            return
        down_at, _, row_of_at = self.moe_fp8_workspace_layout(n, slots, hidden, inter, experts, 0)
        workspace[down_at:down_at + n * slots * hidden * 2].view(torch.bfloat16).copy_(rows.reshape(-1))
        workspace[row_of_at:row_of_at + n * slots * 4].view(torch.int32).copy_(torch.arange(n * slots,
                                                                                           dtype=torch.int32))

    def embed_norm(self, ids, table, scale, add, out, eps, stream, q_weight=None, q=None, q_scale=None):
        self.calls.append("embed_norm" + ("+q" if q is not None else ""))
        x = (table[ids].float() * scale).bfloat16()  # the scale arrives rounded to bf16 already
        if add is not None:
            x = x + add
        out.copy_(REF.rms_norm(x, None, eps))
        if q is not None:
            rq, rs = quant.quantize_rows(REF.rms_norm(out, q_weight, eps).reshape(-1, out.shape[-1]))
            q.copy_(rq)
            q_scale.copy_(rs)

    def ffn_residual_experts(self, x, down, row_of, top_k, w_mlp, w_moe, w_ff, scalar, out, eps, stream,
                             q_weight=None, q=None, q_scale=None):
        self.calls.append("ffn_residual_experts" + ("+q" if q is not None else ""))
        mlp, moe = cuda_moe.ExpertRows(down, row_of, top_k, tuple(x.shape[:-1]), None, None).tensors()
        out.copy_(REF.ffn_residual(x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps))
        if q is not None:
            rq, rs = quant.quantize_rows(REF.rms_norm(out, q_weight, eps).reshape(-1, out.shape[-1]))
            q.copy_(rq)
            q_scale.copy_(rs)


@pytest.fixture
def stand_in(monkeypatch):
    lib = StandInC()
    monkeypatch.setattr(_ext, "require_cuda", lambda: lib)
    monkeypatch.setattr(_ext, "current_stream", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cpu_bf16 = lambda x: x.dtype == torch.bfloat16 and x.numel() > 0  # noqa: E731 - "on the GPU" for the test
    monkeypatch.setattr(cuda_moe, "_kernel_ready", cpu_bf16)
    monkeypatch.setattr(cuda_moe, "_device_index", lambda device: 0)
    monkeypatch.setattr(cuda, "head_dim_supported", lambda head_dim: True)
    monkeypatch.setattr(cuda, "_experts_residual_fits", lambda x, rows, *w: isinstance(rows, cuda_moe.ExpertRows))
    monkeypatch.setattr(cuda, "_embed_norm_fits", lambda ids, table, add: table.dtype == torch.bfloat16)
    monkeypatch.setattr(cuda.QkvOpsMixin, "_qkv_fits", staticmethod(lambda h, w, head_dim, rope_dtype: True))
    monkeypatch.delenv("DGEMMA_DISABLE_KERNELS", raising=False)
    cuda_moe._route_supported.cache_clear()
    cuda_moe._workspace_bytes.cache_clear()
    cuda_moe._rows_layout.cache_clear()
    yield lib
    cuda_moe._route_supported.cache_clear()
    cuda_moe._workspace_bytes.cache_clear()
    cuda_moe._rows_layout.cache_clear()
    cuda_moe._workspaces.clear()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("last", [False, True])
def test_feed_forward_glue_matches_the_reference_ops(stand_in, last):
    eng = random_engine("tiny", seed=12, quantization="fp8", dtype=torch.bfloat16)
    cfg, w = eng.config, eng.model.w
    ops = cuda.CudaOps()
    ops.prepare_weights(w)  # the dense MLP becomes shared experts (and q/k/v one weight)
    lw, nxt = w.layers[0], w.layers[1]
    assert lw.shared_experts is not None and lw.mlp_gate is None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, cfg.hidden_size, generator=g).bfloat16()
    y = (torch.randn(2, 5, cfg.hidden_size, generator=g) * 2).bfloat16()
    eps = cfg.rms_norm_eps

    new_x, mlp, moe = ops.residual_ffn(x, y, lw.post_attn_norm, eps, lw, cfg.top_k)
    ref_x, ref_mlp, ref_moe = REF.residual_ffn(x, y, lw.post_attn_norm, eps, lw, cfg.top_k)
    assert stand_in.calls[:2] == ["moe_route+residual", f"moe_fp8(shared={lw.shared_experts.shared}, combine=False)"]
    assert torch.equal(new_x, ref_x) and new_x.shape == x.shape
    assert isinstance(mlp, cuda_moe.ExpertRows) and mlp is moe
    got_mlp, got_moe = mlp.tensors()
    # The pieces' sum is the MLP (fp32 here, bf16 per piece): within bf16 rounding of the reference's MLP.
    assert got_mlp.shape == got_moe.shape == x.shape
    assert _rel(got_mlp, ref_mlp) < 2e-2 and _rel(got_moe, ref_moe) < 2e-2

    args = (lw.post_mlp_norm, lw.post_moe_norm, lw.post_ff_norm, lw.decoder_scalar, eps)
    ref_out = REF.ffn_residual(ref_x, ref_mlp, ref_moe, *args)
    if last:
        out = ops.ffn_residual(new_x, mlp, moe, *args)
        assert stand_in.calls[-1] == "ffn_residual_experts"
    else:
        out, h = ops.ffn_residual_qkv(new_x, mlp, moe, *args, nxt.input_norm, nxt.attn, cfg.layers[1].head_dim)
        assert stand_in.calls[-1] == "ffn_residual_experts+q"
        assert isinstance(h, quant.Fp8Rows) and h.lead == tuple(x.shape[:-1])
        ref_h = REF.rms_norm(ref_out, nxt.input_norm, eps)
        assert _rel((h.q.float() * h.scale[:, None]).view_as(ref_h), ref_h) < 5e-2
    assert out.shape == x.shape and _rel(out, ref_out) < 2e-2


def test_the_stand_in_takes_the_bindings_arguments(stand_in):
    """Each stand-in entry point has the parameter names and defaults its pybind11 binding declares, so the glue
    calls above would bind to the real module the same way."""
    import re

    import dgemma._C as C

    for name in ("moe_route", "moe_fp8", "moe_fp8_workspace_layout", "ffn_residual_experts",
                 "moe_fp8_workspace_bytes", "embed_norm"):
        doc = getattr(C, name).__doc__.splitlines()[0]
        declared = re.findall(r"(\w+): [^,)=]+(?:=\s*([^,)]+))?", doc[doc.index("(") + 1:doc.rindex(")")])
        params = list(inspect.signature(getattr(stand_in, name)).parameters.values())
        assert [p.name for p in params] == [n for n, _ in declared], name
        for p, (_, default) in zip(params, declared):
            assert (p.default is inspect.Parameter.empty) == (default == ""), (name, p.name)


@pytest.mark.parametrize("with_soft", [False, True])
def test_decoder_input_glue_matches_the_reference_ops(stand_in, with_soft):
    """The decoder input (embedding, self-conditioning add, weightless norm) and the first layer's FP8 q/k/v input
    from one kernel: the same decoder input as the reference ops, and the first layer's rows equal to the reference's
    normed input quantised per row."""
    eng = random_engine("tiny", seed=13, quantization="fp8", dtype=torch.bfloat16)
    cfg, w = eng.config, eng.model.w
    ops = cuda.CudaOps()
    ops.prepare_weights(w)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    add = (torch.randn(2, 6, cfg.hidden_size, generator=g) * 2).bfloat16() if with_soft else None
    first = w.layers[0]
    x, h = ops.embed_norm_qkv(ids, w.embed, cfg.embed_scale, add, cfg.rms_norm_eps, first.input_norm, first.attn,
                              cfg.layers[0].head_dim)
    ref_x, ref_h = REF.embed_norm_qkv(ids, w.embed, cfg.embed_scale, add, cfg.rms_norm_eps, first.input_norm,
                                      first.attn, cfg.layers[0].head_dim)
    assert stand_in.calls == ["embed_norm+q"]
    assert torch.equal(x, ref_x) and isinstance(h, quant.Fp8Rows) and h.lead == (2, 6)
    rq, rs = quant.quantize_rows(ref_h.reshape(-1, cfg.hidden_size))
    assert torch.equal(h.q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(h.scale, rs)
    assert torch.equal(ops.embed_norm(ids, w.embed, cfg.embed_scale, add, cfg.rms_norm_eps), ref_x)


def test_the_expert_rows_residual_limit_is_the_extensions():
    """The ops ask the extension which hidden sizes the residual kernel sums expert rows for (no restated limit)."""
    import dgemma._C as C

    assert C.ffn_residual_experts_unsupported(2816) == ""
    assert C.ffn_residual_experts_unsupported(3072) == ""
    assert C.ffn_residual_experts_unsupported(3080) == "hidden size 3080: expected a multiple of 8 up to 3072"
    assert C.ffn_residual_experts_unsupported(100) == "hidden size 100: expected a multiple of 8 up to 3072"
    cuda._experts_residual_supported.cache_clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cuda._ext, "require_cuda", lambda: C)
        assert cuda._experts_residual_supported(2816) and not cuda._experts_residual_supported(4096)
    cuda._experts_residual_supported.cache_clear()
