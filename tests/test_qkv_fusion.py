"""The CUDA backend's one-GEMM q/k/v projection: the fused FP8 weight and the row views that replace the
three projections (checked on the CPU; the GEMM and the norms+RoPE kernel run in test_engine_cuda.py)."""

import torch

from dgemma.ops.cuda import fuse_qkv
from dgemma.quant import Fp8Weight
from dgemma.random_checkpoint import random_engine


def test_fused_qkv_holds_the_projections_once_and_they_become_views_of_it():
    eng = random_engine("tiny", seed=3, quantization="fp8")
    info_before = eng.info
    for w in (layer.attn for layer in eng.model.w.layers):
        before = [None if p is None else (p.q.clone(), p.scale.clone()) for p in (w.q_proj, w.k_proj, w.v_proj)]
        fused = fuse_qkv(w)
        assert isinstance(fused, Fp8Weight) and fuse_qkv(w) is fused and w.qkv is fused
        parts = [p for p in (w.q_proj, w.k_proj, w.v_proj) if p is not None]
        assert fused.q.shape[0] == sum(p.q.shape[0] for p in parts)
        rows = 0
        for p, old in zip(parts, [b for b in before if b is not None]):
            assert torch.equal(p.q.view(torch.uint8), old[0].view(torch.uint8)) and torch.equal(p.scale, old[1])
            assert p.q.data_ptr() == fused.q[rows].data_ptr() and p.scale.data_ptr() == fused.scale[rows].data_ptr()
            rows += p.q.shape[0]
    # Counted once: the fused weight is derived, its views are what the engine reports.
    assert eng.info.weight_bytes == info_before.weight_bytes


def test_dense_projections_are_not_fused():
    eng = random_engine("tiny", seed=3)
    assert fuse_qkv(eng.model.w.layers[0].attn) is None and eng.model.w.layers[0].attn.qkv is None


def test_gate_up_fusion_makes_the_rows_adjacent_without_changing_the_model():
    from dgemma.ops.cuda import fuse_gate_up
    from dgemma.quant import fuse_rows, rows_adjacent

    eng = random_engine("tiny", seed=5, quantization="fp8")
    ids = torch.randint(0, eng.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    cache = eng.new_cache(1, 64)
    eng.model.encode(ids, cache)
    canvas = torch.randint(0, eng.config.vocab_size, (1, eng.config.canvas_length),
                           generator=torch.Generator().manual_seed(1))
    before = eng.model.denoise(canvas, cache, None)
    info_before = eng.info
    for lw in eng.model.w.layers:
        assert not rows_adjacent(lw.mlp_gate, lw.mlp_up)  # loaded as two allocations
        gate, up = lw.mlp_gate.q.clone(), lw.mlp_up.q.clone()
        fuse_gate_up(lw, "mlp_gate", "mlp_up")
        assert rows_adjacent(lw.mlp_gate, lw.mlp_up)
        assert torch.equal(lw.mlp_gate.q.view(torch.uint8), gate.view(torch.uint8))
        assert torch.equal(lw.mlp_up.q.view(torch.uint8), up.view(torch.uint8))
    # Same values, same bytes reported, same logits (bit for bit: the reference reads the same numbers).
    assert eng.info.weight_bytes == info_before.weight_bytes
    # Fusing what is already one allocation views it: nothing is copied (a second model on the same weights).
    lw = eng.model.w.layers[0]
    gate = lw.mlp_gate
    fused, views = fuse_rows([lw.mlp_gate, lw.mlp_up])
    assert views[0] is gate and fused.q.data_ptr() == gate.q.data_ptr()
    assert fused.q.shape[0] == gate.q.shape[0] + lw.mlp_up.q.shape[0]
    assert torch.equal(fused.q[gate.q.shape[0]:].view(torch.uint8), lw.mlp_up.q.view(torch.uint8))
    fuse_gate_up(lw, "mlp_gate", "mlp_up")
    assert lw.mlp_gate is gate
    assert torch.equal(eng.model.denoise(canvas, cache, None), before)
    # Dense (unquantised) weights and mismatched input sizes are left alone.
    dense = random_engine("tiny", seed=5)
    lw = dense.model.w.layers[0]
    gate = lw.mlp_gate
    fuse_gate_up(lw, "mlp_gate", "mlp_up")
    assert lw.mlp_gate is gate
    w = eng.model.w.layers[0]
    assert fuse_rows([w.mlp_gate, w.mlp_down]) is None and fuse_rows([]) is None


def test_norm_ops_compose_the_norm_and_the_projection_on_the_reference():
    from dgemma.ops import ReferenceOps

    eng = random_engine("tiny", seed=7, quantization="fp8")
    ops, cfg = ReferenceOps(), eng.config
    lw = eng.model.w.layers[0]
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    eps = cfg.rms_norm_eps
    assert torch.equal(ops.norm_gated_mlp(x, lw.pre_ff_norm, eps, lw.mlp_gate, lw.mlp_up, lw.mlp_down),
                       ops.gated_mlp(ops.rms_norm(x, lw.pre_ff_norm, eps), lw.mlp_gate, lw.mlp_up, lw.mlp_down))
    spec = cfg.layers[0]
    cos, sin = eng.model._rope_tables(torch.arange(5)[None], x.dtype)[spec.kind]
    fused = ops.norm_project_qkv(x, lw.input_norm, lw.attn, spec.head_dim, cos, sin, eps)
    plain = ops.project_qkv(ops.rms_norm(x, lw.input_norm, eps), lw.attn, spec.head_dim, cos, sin, eps)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))


def test_every_kinds_rope_tables_in_one_pass_equal_each_kinds_own():
    """The model computes the cos/sin tables of all layer kinds as one table (views per kind): bit-identical to each
    kind's own table, at host and device-style (per-row) positions, and in bf16 and fp32."""
    from dgemma.rope import cos_sin

    eng = random_engine("tiny", seed=2)
    model = eng.model
    assert len(model.inv_freq) == 2
    for positions in (torch.arange(7, 20)[None], torch.tensor([[5], [900]]) + torch.arange(11)):
        for dtype in (torch.bfloat16, torch.float32):
            joint = model._rope_tables(positions, dtype)
            assert joint.keys() == model.inv_freq.keys()
            for kind, inv in model.inv_freq.items():
                cos, sin = cos_sin(inv, positions, dtype)
                assert torch.equal(joint[kind][0], cos) and torch.equal(joint[kind][1], sin)
                assert joint[kind][0].stride(-1) == 1  # rows contiguous in their last dimension (the kernels')
