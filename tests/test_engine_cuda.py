"""The CUDA engine (FP8 projections and experts, dgemma attention) against the reference backend on the
same weights: one denoising step's logits, and generate end to end."""

import re

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


@pytest.mark.gpu
def test_fp8_self_conditioning_generates_like_the_bf16_pass(monkeypatch):
    """DGEMMA_VOCAB_HEAD_SOFT=fp8 at load: the engine builds the FP8 table once and generate runs the FP8 pass (the
    same tokens for the same seed twice); a one-step block (no self-conditioning input yet) gives the bf16 pass's
    tokens."""
    from dgemma.vocab_head import vocab_pad

    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_SOFT", "fp8")
    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    q, scale = eng.model.w.embed_fp8
    assert q.dtype == torch.float8_e4m3fn
    assert tuple(q.shape) == (eng.config.hidden_size, vocab_pad(eng.config.vocab_size))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    ids = torch.randint(3, eng.config.vocab_size, (2, 40), device="cuda")
    a = eng.generate(ids, seed=5, max_new_tokens=512, max_denoising_steps=6, eos_token_id=[])
    b = eng.generate(ids, seed=5, max_new_tokens=512, max_denoising_steps=6, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)
    first_fp8 = eng.generate(ids, seed=5, max_new_tokens=256, max_denoising_steps=1, eos_token_id=[])
    # The generation really took the FP8 pass: its self-conditioning input is the FP8 product's (a first step's soft
    # from the engine's own sampler), not the bf16 one's.
    from dgemma.sampler import GenerationSettings, PhiloxHeadSampler

    cache = eng.encode(ids)
    canvas = torch.randint(0, eng.config.vocab_size, (2, eng.config.canvas_length), device="cuda")
    h = eng.model.denoise_hidden(canvas, cache)
    sampler = PhiloxHeadSampler(eng.model, GenerationSettings(), torch.Generator("cuda").manual_seed(0), eng.device)
    done = torch.zeros(2, dtype=torch.bool, device="cuda")
    soft_fp8 = sampler.step(h, canvas, 6, done).soft
    monkeypatch.delenv("DGEMMA_VOCAB_HEAD_SOFT")
    eng.model.w.embed_fp8 = None
    sampler.counter = 0
    soft_bf16 = sampler.step(h, canvas, 6, done).soft
    rel = float((soft_fp8.float() - soft_bf16.float()).norm() / soft_bf16.float().norm())
    assert 1e-4 < rel <= 3.5e-2, rel
    first_bf16 = eng.generate(ids, seed=5, max_new_tokens=256, max_denoising_steps=1, eos_token_id=[])
    assert torch.equal(first_fp8.sequences, first_bf16.sequences)


@pytest.mark.gpu
def test_fp8_self_conditioning_on_the_mma_sync_head_is_refused_at_load(monkeypatch):
    from dgemma.errors import DgemmaError

    monkeypatch.setenv("DGEMMA_VOCAB_HEAD_SOFT", "fp8")
    monkeypatch.setenv("DGEMMA_VOCAB_HEAD", "mma_sync")
    with pytest.raises(DgemmaError, match=re.escape("DGEMMA_VOCAB_HEAD_SOFT=fp8 cannot run with "
                                                    "DGEMMA_VOCAB_HEAD=mma_sync here: the FP8 self-conditioning pass "
                                                    "runs only on impl 1 (wgmma), got impl 0")):
        random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 5])  # a sliding layer (separate V) and the full layer (V = K's projection)
def test_fused_qkv_projection_matches_the_reference_ops(layer):
    """One FP8 GEMM for q/k/v plus the fused norms + RoPE kernel against the reference ops on the same
    weights (per-row positions, as the decoder passes them)."""
    from dgemma.ops.reference import ReferenceOps
    from dgemma.rope import cos_sin

    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    spec = eng.config.layers[layer]
    w = eng.model.w.layers[layer].attn
    g = torch.Generator(device="cuda").manual_seed(layer)
    h = torch.randn(2, 77, eng.config.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    positions = torch.tensor([[300], [1000]], device="cuda") + torch.arange(77, device="cuda")
    cos, sin = cos_sin(eng.model.inv_freq[spec.kind], positions, torch.bfloat16)
    ref = ReferenceOps().project_qkv(h, w, spec.head_dim, cos, sin, eng.config.rms_norm_eps)
    ours = eng.model.ops.project_qkv(h, w, spec.head_dim, cos, sin, eng.config.rms_norm_eps)
    assert w.qkv is not None
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        # One per-token FP8 quantisation of h (the reference keeps it exact): relative Frobenius <= 3.5e-2.
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err <= 3.5e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 77, 2816), (5, 100)])
def test_residual_norm_kernels_round_like_the_reference_ops(dtype, shape):
    """add_rms_norm and ffn_residual, one kernel each, against the reference's chain of ops: at most one
    ulp of the output dtype apart (rsqrt vs pow in the norms), and in bf16 rarely even that."""
    from dgemma.ops.cuda import CudaOps
    from dgemma.ops.reference import ReferenceOps

    g = torch.Generator(device="cuda").manual_seed(len(shape))
    x, a, b = (torch.randn(shape, generator=g, device="cuda").mul(s).to(dtype) for s in (1.0, 3.0, 0.5))
    wa, wb, wc = ((torch.rand(shape[-1], generator=g, device="cuda") + 0.5).to(dtype) for _ in range(3))
    scalar = torch.full((1,), 0.8125, dtype=dtype, device="cuda")
    ours, ref = CudaOps(), ReferenceOps()
    pairs = [(ours.add_rms_norm(x, a, wa, 1e-6), ref.add_rms_norm(x, a, wa, 1e-6)),
             (ours.ffn_residual(x, a, b, wa, wb, wc, scalar, 1e-6), ref.ffn_residual(x, a, b, wa, wb, wc, scalar, 1e-6))]
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-20
    for got, want in pairs:
        assert got.dtype == dtype and got.shape == want.shape
        diff = (got.float() - want.float()).abs()
        # An ulp of the normed branch before the residual add may survive cancellation against x.
        assert (diff <= (want.float().abs() + 2 * x.float().abs()) * ulp + 1e-6).all()
        if dtype == torch.bfloat16:
            # Rounding to bf16 hides the fp32 differences (rsqrt vs pow, fused multiply-adds) almost always; in fp32
            # they show as one-ulp differences in a good share of the outputs, within the bound above.
            assert (diff > 0).float().mean() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("with_add", [False, True])
def test_decoder_input_kernel_equals_the_kernels_it_replaces(with_add):
    """embed_norm (one kernel): bit-identical to the CUDA chain it replaces — the embedding times the bf16-rounded
    scale, the self-conditioning add, the weightless rms_norm kernel — and its FP8 rows equal rms_norm_fp8 of its
    output with the first layer's input norm; an id outside the table gives a zero row, not a fault."""
    from dgemma.ops import cuda
    from dgemma.ops.cuda_moe import rms_norm_fp8
    from dgemma.ops.reference import ReferenceOps

    g = torch.Generator(device="cuda").manual_seed(5)
    vocab, hidden = 1000, 2816
    table = (torch.randn(vocab, hidden, generator=g, device="cuda") * 0.05).bfloat16()
    ids = torch.randint(0, vocab, (2, 77), generator=g, device="cuda")
    add = (torch.randn(2, 77, hidden, generator=g, device="cuda") * 3).bfloat16() if with_add else None
    norm = (torch.rand(hidden, generator=g, device="cuda") + 0.5).bfloat16()
    scale = hidden ** 0.5
    x = ReferenceOps().embed(ids, table, scale)
    if add is not None:
        x = x + add
    want = cuda.rms_norm(x, None, 1e-6)
    assert torch.equal(cuda.embed_norm(ids, table, scale, add, 1e-6), want)
    got, rows = cuda.embed_norm(ids, table, scale, add, 1e-6, norm)
    ref_rows = rms_norm_fp8(want, norm, 1e-6)
    assert torch.equal(got, want) and rows.lead == (2, 77)
    assert torch.equal(rows.q.view(torch.uint8), ref_rows.q.view(torch.uint8)) and torch.equal(rows.scale, ref_rows.scale)
    bad = ids.clone()
    bad[0, 3] = vocab + 5
    out = cuda.embed_norm(bad, table, scale, None, 1e-6)
    torch.cuda.synchronize()
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))


@pytest.mark.gpu
def test_batched_decoder_rows_equal_each_row_alone_on_the_gpu():
    """The server's batched decoder pass (FP8 linears and experts over all rows, attention per row): each
    row bit-identical to its own pass, so a request's tokens do not depend on what else is batched."""
    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = []
    for t in (40, 700, 1300):
        cache = eng.new_cache(1, t + 256)
        eng.encode(torch.randint(3, eng.config.vocab_size, (1, t), generator=g, device="cuda"), cache=cache)
        caches.append(cache)
    canvas = torch.randint(0, eng.config.vocab_size, (3, 256), generator=g, device="cuda")
    soft = torch.randn(1, 256, eng.config.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    softs = [None, soft, soft]
    rows = eng.model.denoise_hidden_rows(canvas, caches, softs)
    for r in range(3):
        alone = eng.model.denoise_hidden(canvas[r:r + 1], caches[r], softs[r])
        assert torch.equal(rows[r:r + 1], alone), (r, _rel(rows[r:r + 1], alone))


# Kernels one layer of the FP8 CUDA path launches in a denoising step: QKV GEMM, qkv_prep, attention (its split-KV
# combine runs in the attention kernel's last split), o_proj quantise + GEMM, router (which also forms the attention
# residual), plan, gather (pre-MoE and MLP norms), expert GEMM, gelu_up, expert GEMM (the dense MLP runs inside the
# expert GEMMs as shared experts), ffn residual (sums the expert rows itself and writes the next layer's FP8 attention
# input; the first layer's comes from rms_norm_fp8): 12. The step adds its own (embedding, RoPE tables, decoder
# input, final norm, vocabulary head, sampler).
KERNELS_PER_LAYER = 12
KERNELS_PER_STEP = 80


@pytest.mark.gpu
def test_a_denoising_step_launches_few_kernels_per_layer():
    """The launch count of one step as generate runs it (fused head, FP8), counted by the profiler: a regression
    guard for the fusions (issue: at most 400 kernels per step at the 26B shapes)."""
    from dgemma.bench import profile
    from dgemma.sampler import GenerationSettings, make_sampler
    from dgemma.steps import make_stepper

    eng = random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")
    cfg = eng.config
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, 100), generator=g, device="cuda")
    cache = eng.new_cache(1, 100 + cfg.canvas_length, rollback=cfg.canvas_length)
    eng.encode(prompt, cache=cache)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g, device="cuda")
    settings = GenerationSettings(max_denoising_steps=4)
    stepper = make_stepper(eng, cache, make_sampler(eng, settings, g))
    logits = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g, device="cuda").to(torch.bfloat16)
    soft = eng.model.soft_input(logits)
    running = torch.zeros(1, dtype=torch.bool, device="cuda")
    summary = profile(lambda: stepper(canvas, soft, 4, running), torch.device("cuda"))
    bound = KERNELS_PER_LAYER * cfg.num_layers + KERNELS_PER_STEP
    top = "\n".join(f"{k['launches']:5d}x {k['name'][:100]}" for k in summary["top_kernels"])
    assert summary["kernels"] <= bound, f"{summary['kernels']} kernels > {bound}; the costliest:\n{top}"
    assert summary["host_syncs"] <= 1
