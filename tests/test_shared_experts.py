"""The dense MLP as shared experts of the expert stacks (the CUDA backend's layout, checked on the CPU): the stacked
weights hold exactly the originals, the engine's results and accounting do not change, and the MLP equals the sum
of its pieces. The pipeline itself (moe_fp8(shared=...)) runs in tests/test_moe_cuda.py."""

from types import SimpleNamespace

import pytest
import torch

import moe_reference as mref
from dgemma import quant
from dgemma.ops.cuda_moe import share_dense_mlp
from dgemma.quant import Fp8Weight, quantize_weight, rows_adjacent
from dgemma.random_checkpoint import random_engine
from dgemma.weights import named_tensors


def _bytes(w: Fp8Weight) -> torch.Tensor:
    return w.q.view(torch.uint8)


def _same(a: Fp8Weight, b: Fp8Weight) -> bool:
    return a.q.shape == b.q.shape and torch.equal(_bytes(a), _bytes(b)) and torch.equal(a.scale, b.scale)


def _denoise(eng, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, eng.config.vocab_size, (2, 9), generator=g)
    cache = eng.new_cache(2, 64)
    eng.model.encode(ids, cache)
    canvas = torch.randint(0, eng.config.vocab_size, (2, eng.config.canvas_length), generator=g)
    return eng.model.denoise(canvas, cache, None)


def test_sharing_keeps_every_weight_and_the_model_unchanged():
    eng = random_engine("tiny", seed=11, quantization="fp8")
    cfg = eng.config
    before = _denoise(eng)
    info_before = eng.info
    originals = [(lw.mlp_gate, lw.mlp_up, lw.mlp_down, lw.experts_gate_up, lw.experts_down) for lw in eng.model.w.layers]
    pieces = cfg.intermediate_size // cfg.moe_intermediate_size
    assert pieces * cfg.moe_intermediate_size == cfg.intermediate_size and pieces > 1
    for lw, (gate, up, down, gu, dn) in zip(eng.model.w.layers, originals):
        assert share_dense_mlp(lw)
        sh = lw.shared_experts
        assert share_dense_mlp(lw) and lw.shared_experts is sh  # idempotent
        assert lw.mlp_gate is None and lw.mlp_up is None and lw.mlp_down is None
        assert sh.shared == pieces
        assert sh.stack_gate_up.q.shape == (cfg.num_experts + pieces, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert sh.stack_down.q.shape == (cfg.num_experts + pieces, cfg.hidden_size, cfg.moe_intermediate_size)
        assert sh.stack_gate_up.q.is_contiguous() and sh.stack_down.q.is_contiguous()
        # The routed experts are views of the stacks' heads, the pieces of their tails: one copy of each weight.
        assert lw.experts_gate_up.q.data_ptr() == sh.stack_gate_up.q.data_ptr()
        assert sh.gate_up.q.data_ptr() == sh.stack_gate_up.q[cfg.num_experts].data_ptr()
        assert sh.down.scale.data_ptr() == sh.stack_down.scale[cfg.num_experts].data_ptr()
        assert _same(lw.experts_gate_up, gu) and _same(lw.experts_down, dn)
        # Piece c: gate and up rows [c*I, (c+1)*I), the down columns of that range, the down rows' scales.
        i = cfg.moe_intermediate_size
        for c in range(pieces):
            assert torch.equal(_bytes(Fp8Weight(sh.gate_up.q[c, :i], sh.gate_up.scale[c, :i])),
                               _bytes(Fp8Weight(gate.q[c * i:(c + 1) * i], gate.scale[c * i:(c + 1) * i])))
            assert torch.equal(sh.gate_up.scale[c, i:], up.scale[c * i:(c + 1) * i])
            assert torch.equal(sh.down.q[c].view(torch.uint8), down.q[:, c * i:(c + 1) * i].view(torch.uint8))
            assert torch.equal(sh.down.scale[c], down.scale)
        for new, old in zip(lw.mlp_weights(), (gate, up, down)):
            assert _same(new, old)
        # Reassembled once and kept, gate/up adjacent (one GEMM on a path that runs the MLP apart).
        assert lw.mlp_weights()[0] is lw.mlp_weights()[0]
        assert rows_adjacent(lw.mlp_weights()[0], lw.mlp_weights()[1])
    # Counted once (the stacks are derived; the experts' views and the pieces are what the engine holds): only the
    # dense down rows' fp32 scales are held once per piece.
    repeated_scales = (pieces - 1) * cfg.hidden_size * 4 * len(originals)
    assert eng.info.weight_bytes == info_before.weight_bytes + repeated_scales
    # The reference ops read the MLP reassembled: the same logits bit for bit.
    assert torch.equal(_denoise(eng), before)
    # named_tensors gives the checkpoint's tensors back (the MLP reassembled).
    tensors = named_tensors(cfg, eng.model.w)
    for lw_index, (gate, up, down, _, _) in enumerate(originals):
        prefix = f"model.decoder.layers.{lw_index}.mlp."
        assert _same(tensors[prefix + "gate_proj.weight"], gate) and _same(tensors[prefix + "down_proj.weight"], down)


def _layer(dense_inter, inter=16, hidden=32, experts=4, fp8=True):
    g = torch.Generator().manual_seed(dense_inter)
    w = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = quantize_weight if fp8 else (lambda t: t)
    return SimpleNamespace(mlp_gate=q(w(dense_inter, hidden)), mlp_up=q(w(dense_inter, hidden)),
                           mlp_down=q(w(hidden, dense_inter)), experts_gate_up=q(w(experts, 2 * inter, hidden)),
                           experts_down=q(w(experts, hidden, inter)), shared_experts=None)


@pytest.mark.parametrize("why,layer", [
    ("dense intermediate not a multiple of the expert's", _layer(40)),
    ("more than 16 pieces", _layer(17 * 16)),
    ("bf16 weights", _layer(32, fp8=False)),
])
def test_sharing_is_refused_where_the_layout_does_not_fit(why, layer):
    gate = layer.mlp_gate
    assert not share_dense_mlp(layer), why
    assert layer.shared_experts is None and layer.mlp_gate is gate


def test_the_dense_mlp_is_the_sum_of_its_pieces():
    """Exactly (fp64, dequantised weights): the MLP's gate/up rows and down columns split by intermediate channel;
    and the FP8 pipeline's reference (each piece's intermediate quantised per row) stays within FP8 error of the
    MLP quantised as one (per token)."""
    layer = _layer(48)
    gate, up, down = layer.mlp_gate, layer.mlp_up, layer.mlp_down
    assert share_dense_mlp(layer)
    sh = layer.shared_experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    gelu = quant.gelu_tanh_reference
    dense = (gelu(x @ gate.dequantize(torch.float64).t()) * (x @ up.dequantize(torch.float64).t())) \
        @ down.dequantize(torch.float64).t()
    gu, dn = sh.gate_up.dequantize(torch.float64), sh.down.dequantize(torch.float64)
    pieces = sum((gelu(x @ gu[c, :16].t()) * (x @ gu[c, 16:].t())) @ dn[c].t() for c in range(sh.shared))
    assert torch.allclose(pieces, dense, rtol=1e-12, atol=1e-12)

    xb = (x * 3).bfloat16()
    ids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1]], dtype=torch.int32)
    weights = torch.rand(5, 2, generator=g)
    routed, mlp = mref.moe_fp8_shared(xb, ids, weights, sh.stack_gate_up, sh.stack_down, sh.shared)
    one_quant = quant.gated_mlp_reference(xb, gate, up, down)
    assert mref.rel_err(mlp, one_quant) <= 6e-2
    exact = mref.moe_fp8_contiguous(xb, ids, weights, layer.experts_gate_up, layer.experts_down)
    assert torch.equal(routed, exact)  # the shared experts add nothing to the routed sum


def test_expert_rows_sum_like_the_combine():
    """ExpertRows.tensors() (the fallback of the CUDA backend's unsummed expert rows): per token, the routed slots'
    rows and the shared slots' rows each summed in slot order in fp32 and rounded once; a slot without a row (-1)
    adds nothing."""
    from dgemma.ops.cuda_moe import ExpertRows

    g = torch.Generator().manual_seed(4)
    down = torch.randn(30, 16, generator=g).bfloat16()
    row_of = torch.randperm(30, generator=g)[:4 * 5].view(4, 5).int()
    row_of[2, 0] = -1
    rows = ExpertRows(down, row_of, 3, (2, 2), None, None)
    mlp, moe = rows.tensors()
    assert mlp.shape == moe.shape == (2, 2, 16) and mlp.dtype == moe.dtype == torch.bfloat16
    for t in range(4):
        routed, shared = torch.zeros(16), torch.zeros(16)
        for k in range(5):
            r = int(row_of[t, k])
            if r < 0:
                continue
            if k < 3:
                routed = routed + down[r].float()
            else:
                shared = shared + down[r].float()
        assert torch.equal(moe.view(4, 16)[t], routed.bfloat16()) and torch.equal(mlp.view(4, 16)[t], shared.bfloat16())
