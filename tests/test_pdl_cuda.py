"""Programmatic dependent launch (DGEMMA_PDL=1, csrc/kernels/pdl.cuh): every dgemma kernel may start while the one
before it finishes, and waits for it before touching memory. The results must be those of ordinary launches bit for
bit: a denoising step's logits, the FP8 expert pipeline (shared experts included), and generate eagerly and from CUDA
graphs (the stop decided on the device too), with either vocabulary-head implementation. DGEMMA_PDL is read once per
process, so each setting runs in its own process."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

PROBE = r"""
import sys
import torch
from dgemma.ops import cuda_moe
from dgemma.quant import quantize_weight
from dgemma.random_checkpoint import random_engine

out = {}
eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.randint(3, eng.config.vocab_size, (2, 77), generator=g, device="cuda")
canvas = torch.randint(0, eng.config.vocab_size, (2, eng.config.canvas_length), generator=g, device="cuda")
out["logits"] = eng.denoise(eng.encode(ids), canvas).float().cpu()
kw = dict(max_new_tokens=512, max_denoising_steps=6, eos_token_id=[], pad_token_id=0, confidence_threshold=1e-30)
out["eager"] = eng.generate(ids[:1], seed=3, **kw).sequences.cpu()
eng.cuda_graphs = True
cache = eng.new_cache(1, 77 + 512 + 512)
out["graphs"] = eng.generate(ids[:1], seed=3, cache=cache, **kw).sequences.cpu()
assert cache._graph_stepper.failed is None, cache._graph_stepper.failed
# The vocabulary head on the CUTLASS wgmma GEMMs (looked up at each call), eagerly and from graphs.
import os
os.environ["DGEMMA_VOCAB_HEAD"] = "wgmma"
eng.cuda_graphs = False
out["wgmma_eager"] = eng.generate(ids[:1], seed=3, **kw).sequences.cpu()
eng.cuda_graphs = True
cache = eng.new_cache(1, 77 + 512 + 512)
out["wgmma_graphs"] = eng.generate(ids[:1], seed=3, cache=cache, **kw).sequences.cpu()
assert cache._graph_stepper.failed is None, cache._graph_stepper.failed
del os.environ["DGEMMA_VOCAB_HEAD"]
# The stop decided on the device: the steps captured under conditional graph nodes (programmatic launches inside
# their bodies with DGEMMA_PDL=1).
os.environ["DGEMMA_STOP_ON_DEVICE"] = "1"
cache = eng.new_cache(1, 77 + 512 + 512)
out["stop_on_device"] = eng.generate(ids[:1], seed=3, cache=cache, **kw).sequences.cpu()
stepper = cache._graph_stepper
assert stepper.failed is None and stepper.conditional_failed is None, (stepper.failed, stepper.conditional_failed)
del os.environ["DGEMMA_STOP_ON_DEVICE"]

# The expert pipeline at the model's shapes, shared experts included, at a size that plans on every SM.
H, I, E = 2816, 704, 131
gu = quantize_weight((torch.randn(E, 2 * I, H, device="cuda", generator=g) * H ** -0.5).bfloat16())
dn = quantize_weight((torch.randn(E, H, I, device="cuda", generator=g) * I ** -0.5).bfloat16())
for n in (256, 2048):
    x = torch.randn(n, H, device="cuda", generator=g).bfloat16()
    e = torch.rand(n, 128, device="cuda", generator=g).argsort(1)[:, :8].int()
    w = torch.rand(n, 8, device="cuda", generator=g)
    norm = (torch.rand(H, device="cuda", generator=g) + 0.5).bfloat16()
    moe, mlp = cuda_moe.moe_fp8(x, e, w, gu, dn, norm=norm, shared=3, shared_norm=norm)
    out[f"moe{n}"], out[f"mlp{n}"] = moe.cpu(), mlp.cpu()
torch.cuda.synchronize()
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, pdl: str) -> dict:
    path = tmp_path / f"pdl{pdl}.pt"
    env = dict(os.environ, DGEMMA_PDL=pdl)
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(path)


def test_programmatic_launches_give_the_results_of_ordinary_ones(tmp_path):
    plain, pdl = _run(tmp_path, "0"), _run(tmp_path, "1")
    assert plain.keys() == pdl.keys()
    for key in plain:
        assert torch.equal(plain[key], pdl[key]), key
    assert torch.equal(plain["graphs"], plain["eager"])
    assert torch.equal(plain["wgmma_graphs"], plain["wgmma_eager"])
    assert torch.equal(plain["stop_on_device"], plain["eager"])
