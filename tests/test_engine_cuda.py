"""The CUDA engine (FP8 projections and experts, dgemma attention) against the reference backend on the
same weights: one denoising step's logits, and generate end to end."""

import pytest
import torch

from dgemma.quant import Fp8Weight
from dgemma.random_checkpoint import random_engine
from dgemma.weights import ModelWeights, named_tensors


def _as_reference(eng, dtype):
    """A reference-backend engine on the same (FP8) weights, computing in ``dtype``."""
    from dgemma.engine import Engine

    tensors = {k: (v if isinstance(v, Fp8Weight) else v.to(dtype)) for k, v in
               named_tensors(eng.config, eng.model.w).items()}
    return Engine(eng.config, ModelWeights.from_tensors(eng.config, tensors), device=eng.device, dtype=dtype,
                  backend="reference")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,prompt", [(1, 100), (2, 37)])
def test_cuda_engine_logits_match_reference(batch, prompt):
    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    ref32, ref16 = _as_reference(eng, torch.float32), _as_reference(eng, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(batch)
    ids = torch.randint(3, eng.config.vocab_size, (batch, prompt), generator=g, device="cuda")
    canvas = torch.randint(0, eng.config.vocab_size, (batch, 256), generator=g, device="cuda")
    ours = eng.denoise(eng.encode(ids), canvas)
    exact = ref32.denoise(ref32.encode(ids), canvas)
    same_precision = ref16.denoise(ref16.encode(ids), canvas)
    assert torch.isfinite(ours).all()
    bound = max(2 * _rel(same_precision, exact), 2e-2)
    assert _rel(ours, exact) <= bound, f"{_rel(ours, exact):.3e} > {bound:.3e}"


@pytest.mark.gpu
def test_cuda_engine_generates_and_does_not_leak():
    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    ids = torch.randint(3, eng.config.vocab_size, (1, 50), device="cuda")
    eng.generate(ids, seed=0, max_new_tokens=256, max_denoising_steps=2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        out = eng.generate(ids, seed=0, max_new_tokens=512, max_denoising_steps=2, eos_token_id=[])
    torch.cuda.synchronize()
    assert out.sequences.shape == (1, 50 + 512)
    assert torch.cuda.memory_allocated() - before < 64 * 2**20
