"""Logits of dgemma's reference model against transformers' DiffusionGemmaForBlockDiffusion."""

import pytest
import torch
from conftest import load_hf
from hf_checkpoints import ARCHS

import dgemma


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run_both(path, dtype, *, batch=2, prompt_len=None, canvas=8, blocks=2, seed=0):
    """Prompt -> step 1 (no self-conditioning) -> step 2 (self-conditioned) -> commit blocks, each
    followed by a self-conditioned step. Returns the list of (dgemma, transformers) logits pairs."""
    hf = load_hf(path, dtype)
    eng = dgemma.load(path, device="cpu", dtype=dtype)
    window = eng.config.sliding_window or 4
    prompt_len = prompt_len or window + 5  # longer than the sliding window
    g = torch.Generator().manual_seed(seed)
    v = eng.config.vocab_size
    prompt = torch.randint(0, v, (batch, prompt_len), generator=g)
    pairs = []
    with torch.no_grad():
        cv = torch.randint(0, v, (batch, canvas), generator=g)
        ref = hf(input_ids=prompt, decoder_input_ids=cv)
        hf_cache = ref.past_key_values
        cache = eng.encode(prompt)
        ours = eng.denoise(cache, cv)
        pairs.append((ours, ref.logits))
        sc = ref.logits
        cv = torch.randint(0, v, (batch, canvas), generator=g)
        ref = hf(past_key_values=hf_cache, decoder_input_ids=cv, self_conditioning_logits=sc)
        pairs.append((eng.denoise(cache, cv, sc), ref.logits))
        for _ in range(blocks):
            block = torch.randint(0, v, (batch, canvas), generator=g)
            cv = torch.randint(0, v, (batch, canvas), generator=g)
            sc = torch.randn(batch, canvas, v, generator=g) * 5
            ref = hf(input_ids=block, past_key_values=hf_cache, decoder_input_ids=cv, self_conditioning_logits=sc)
            cache = eng.encode(block, cache=cache)
            pairs.append((eng.denoise(cache, cv, sc), ref.logits))
    return pairs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_logits_match_transformers(hf_checkpoint, arch):
    pairs = run_both(hf_checkpoint(arch), torch.float32)
    for i, (ours, ref) in enumerate(pairs):
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-5, f"step {i}: relative error {rel_err(ours, ref):.2e}"


def test_fp32_batch1_long_prompt_many_blocks(hf_checkpoint):
    pairs = run_both(hf_checkpoint("odd"), torch.float32, batch=1, prompt_len=30, blocks=4, canvas=5)
    for i, (ours, ref) in enumerate(pairs):
        assert rel_err(ours, ref) < 1e-5, f"step {i}"


# NOTE: in bf16 we round where transformers' eager path rounds (norms in fp32 then cast, MoE summed
# in bf16 expert by expert); with torch 2.13 on CPU the logits agree bit for bit. The bound leaves room
# for other torch builds' bf16 matmul kernels.
BF16_TOL = 1e-2


@pytest.mark.parametrize("arch", ["odd", "a4b_scaled"])
def test_bf16_logits_match_transformers(hf_checkpoint, arch):
    pairs = run_both(hf_checkpoint(arch, torch.bfloat16), torch.bfloat16)
    for i, (ours, ref) in enumerate(pairs):
        assert rel_err(ours, ref) < BF16_TOL, f"step {i}: relative error {rel_err(ours, ref):.2e}"


@pytest.mark.parametrize("saved,loaded", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cross_dtype_loading(hf_checkpoint, saved, loaded):
    pairs = run_both(hf_checkpoint("odd", saved), loaded, blocks=1)
    tol = 1e-5 if loaded == torch.float32 else BF16_TOL
    for ours, ref in pairs:
        assert ours.dtype == torch.float32
        assert rel_err(ours, ref) < tol


def test_sharded_checkpoint(hf_checkpoint):
    path = hf_checkpoint("a4b_scaled", max_shard_size="400KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    for ours, ref in run_both(path, torch.float32, blocks=1):
        assert rel_err(ours, ref) < 1e-5


def test_chunked_prefill_equals_one_shot(hf_checkpoint):
    eng = dgemma.load(hf_checkpoint("odd"), dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, eng.config.vocab_size, (2, 29), generator=g)
    canvas = torch.randint(0, eng.config.vocab_size, (2, 8), generator=g)
    one = eng.denoise(eng.encode(prompt), canvas)
    cache = eng.encode(prompt[:, :3], capacity=64)
    for s, e in [(3, 4), (4, 13), (13, 29)]:  # chunks shorter and longer than the window (7)
        cache = eng.encode(prompt[:, s:e], cache=cache)
    assert cache.length == 29
    torch.testing.assert_close(eng.denoise(cache, canvas), one, rtol=0, atol=2e-5)


def test_denoise_never_modifies_cache(hf_checkpoint):
    eng = dgemma.load(hf_checkpoint("odd"), dtype=torch.float32)
    cache = eng.encode(torch.randint(0, eng.config.vocab_size, (2, 12)))
    before = [t.clone() for t in cache.keys + cache.values] + [cache.valid.clone()]
    length = cache.length
    a = eng.denoise(cache, torch.randint(0, eng.config.vocab_size, (2, 8)))
    b = eng.denoise(cache, torch.randint(0, eng.config.vocab_size, (2, 8)), a)
    assert cache.length == length
    for x, y in zip(before, cache.keys + cache.values + [cache.valid]):
        assert torch.equal(x, y)
    assert torch.isfinite(b).all()


def test_logits_are_softcapped(hf_checkpoint):
    eng = dgemma.load(hf_checkpoint("mha"), dtype=torch.float32)
    cache = eng.encode(torch.randint(0, eng.config.vocab_size, (1, 6)))
    logits = eng.denoise(cache, torch.randint(0, eng.config.vocab_size, (1, 8)))
    assert logits.abs().max() < eng.config.final_logit_softcapping
