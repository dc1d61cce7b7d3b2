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
