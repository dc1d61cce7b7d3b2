"""generate() against transformers' DiffusionGemmaForBlockDiffusion.generate: same random stream,
same sequences, token for token."""

import pytest
import torch
from conftest import load_hf

import dgemma
from dgemma.sampler import StableAndConfident, entropy_bound_accept


@pytest.fixture(scope="module")
def patched_decoder_mask():
    """transformers 5.23 crashes in generate() with eager attention and a padding mask (it builds the
    decoder mask from the integer canvas, and torch.finfo rejects integer dtypes). Give it a float
    tensor of the same shape; the mask it builds is unchanged."""
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as m

    cls = m.DiffusionGemmaDecoderModel
    original = cls.create_diffusion_decoder_attention_mask

    def patched(config, inputs_embeds, past_key_values, decoder_attention_mask=None):
        return original(config, inputs_embeds.float(), past_key_values, decoder_attention_mask)

    cls.create_diffusion_decoder_attention_mask = staticmethod(patched)
    yield
    cls.create_diffusion_decoder_attention_mask = staticmethod(original)


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    cache = {}

    def get(arch="odd", dtype=torch.float32):
        if (arch, dtype) not in cache:
            path = hf_checkpoint(arch, dtype)
            cache[(arch, dtype)] = (load_hf(path, dtype), dgemma.load(path, dtype=dtype))
        return cache[(arch, dtype)]

    return get


def both(hf, eng, prompt, seed=11, **kw):
    torch.manual_seed(seed)
    hf_kw = dict(kw)
    if "canvas" in hf_kw:
        hf_kw["decoder_input_ids"] = hf_kw.pop("canvas")
    if "entropy_bound" in hf_kw:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        hf_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(hf_kw.pop("entropy_bound")))
    ref = hf.generate(prompt, **hf_kw)
    ours = eng.generate(prompt, generator=torch.Generator().manual_seed(seed), **kw)
    return ref, ours


def prompts(eng, batch, length, seed=1):
    return torch.randint(3, eng.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# Every case runs several 8-token blocks; eos/pad are given explicitly (transformers has no default).
CASES = {
    "defaults_two_blocks": dict(max_new_tokens=16, max_denoising_steps=48, eos_token_id=[1], pad_token_id=0),
    "budget_not_a_multiple": dict(max_new_tokens=21, max_denoising_steps=12, eos_token_id=[1], pad_token_id=0),
    "eos_padding": dict(max_new_tokens=40, max_denoising_steps=8, entropy_bound=1.0,
                        eos_token_id=list(range(1, 12)), pad_token_id=0),
    "early_stop_by_confidence": dict(max_new_tokens=24, max_denoising_steps=10, t_max=1.5, t_min=0.05,
                                     stability_threshold=0, confidence_threshold=3.0, eos_token_id=[1],
                                     pad_token_id=0),
    "stop_after_one_step": dict(max_new_tokens=24, max_denoising_steps=10, stability_threshold=0,
                                confidence_threshold=50.0, eos_token_id=[2, 7], pad_token_id=0),
    "wide_acceptance": dict(max_new_tokens=32, max_denoising_steps=6, entropy_bound=40.0, t_max=3.0, t_min=0.5,
                            eos_token_id=[5], pad_token_id=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequences_match_transformers(models, case):
    hf, eng = models()
    ref, ours = both(hf, eng, prompts(eng, 3, 9), **CASES[case])
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.tokens_per_forward, ref.tokens_per_forward)


def test_case_coverage(models):
    """The cases above really exercise what they are named after."""
    hf, eng = models()
    p = prompts(eng, 3, 9)
    early = eng.generate(p, seed=11, **CASES["early_stop_by_confidence"])
    flat = [s for block in early.steps_per_block for s in block]
    assert min(flat) < 10 and len(set(flat)) > 1  # rows stop at different steps
    one = eng.generate(p, seed=11, **CASES["stop_after_one_step"])
    assert all(s == 1 for block in one.steps_per_block for s in block)
    eos = eng.generate(p, seed=11, **CASES["eos_padding"])
    assert (eos.new_tokens == 0).any() and len(eos.steps_per_block) >= 2
    odd = eng.generate(p, seed=11, **CASES["budget_not_a_multiple"])
    assert odd.new_tokens.shape[1] == 24  # 21 tokens round up to three 8-token canvases


def test_left_padded_batch_matches_transformers(models, patched_decoder_mask):
    hf, eng = models()
    p = prompts(eng, 3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    kw = dict(max_new_tokens=40, max_denoising_steps=12, eos_token_id=[1], pad_token_id=0)
    ref, ours = both(hf, eng, p, attention_mask=mask, **kw)
    assert torch.equal(ours.sequences, ref.sequences)


def test_user_canvas_matches_transformers(models):
    hf, eng = models()
    p = prompts(eng, 2, 6)
    canvas = torch.randint(0, eng.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    ref, ours = both(hf, eng, p, canvas=canvas, max_new_tokens=16, max_denoising_steps=5, eos_token_id=[1],
                     pad_token_id=0)
    assert torch.equal(ours.sequences, ref.sequences)


@pytest.mark.parametrize("arch", ["a4b_scaled", "mha"])
def test_other_architectures_match(models, arch):
    hf, eng = models(arch)
    ref, ours = both(hf, eng, prompts(eng, 2, 20), max_new_tokens=24, max_denoising_steps=8, eos_token_id=[1],
                     pad_token_id=0)
    assert torch.equal(ours.sequences, ref.sequences)


def test_bf16_matches_transformers(models):
    hf, eng = models("odd", torch.bfloat16)
    ref, ours = both(hf, eng, prompts(eng, 2, 9), max_new_tokens=24, max_denoising_steps=8, eos_token_id=[1],
                     pad_token_id=0)
    assert torch.equal(ours.sequences, ref.sequences)


def test_seed_is_reproducible_and_matters(models):
    _, eng = models()
    p = prompts(eng, 2, 9)
    a = eng.generate(p, seed=3, max_new_tokens=16, max_denoising_steps=4)
    b = eng.generate(p, seed=3, max_new_tokens=16, max_denoising_steps=4)
    c = eng.generate(p, seed=4, max_new_tokens=16, max_denoising_steps=4)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_stream_callback_and_iterator(models):
    _, eng = models()
    p = prompts(eng, 1, 9)
    events = []
    res = eng.generate(p, seed=2, max_new_tokens=16, max_denoising_steps=3, stream=events.append)
    kinds = [e.kind for e in events]
    assert kinds == ["draft"] * 3 + ["block"] + ["draft"] * 3 + ["block"]
    assert [e.step for e in events if e.kind == "draft"] == [3, 2, 1, 3, 2, 1]
    assert torch.equal(events[3].tokens, res.new_tokens[:, :8])
    assert torch.equal(events[2].tokens, events[3].tokens)  # the committed block is the last argmax draft
    items = list(eng.generate_stream(p, seed=2, max_new_tokens=16, max_denoising_steps=3))
    assert torch.equal(items[-1].sequences, res.sequences)
    assert [e.kind for e in items[:-1]] == kinds


def test_multi_turn_cache_reuse_equals_fresh_encoding(models):
    """Continuing from a cache encodes only the new tokens and scores like encoding everything."""
    _, eng = models()
    p = prompts(eng, 1, 9)
    first = eng.generate(p, seed=1, max_new_tokens=16, max_denoising_steps=3, eos_token_id=[], pad_token_id=0,
                         capacity=64)
    cache = first.cache
    assert cache.capacity == 64 and cache.length == 9 + 8  # the prompt and the first committed block (the last one is not encoded)
    follow = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(9))
    history = torch.cat([first.sequences[:, : cache.length], follow], dim=1)
    canvas = torch.randint(0, eng.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    a = eng.generate(follow, cache=cache, canvas=canvas, seed=5, max_new_tokens=8, max_denoising_steps=3)
    b = eng.generate(history, canvas=canvas, seed=5, max_new_tokens=8, max_denoising_steps=3)
    assert torch.equal(a.new_tokens, b.new_tokens)


def test_stopping_rule_matches_transformers():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import StableAndConfidentStoppingCriteria

    g = torch.Generator().manual_seed(0)
    for stability in (0, 1, 2, 3):
        ours, ref = StableAndConfident(stability, 1.5), StableAndConfidentStoppingCriteria(stability, 1.5)
        canvas = torch.randint(0, 4, (5, 6), generator=g)
        for step in range(8):
            if step % 3 == 2:  # change some rows' argmax now and then
                canvas = canvas.clone()
                canvas[step % 5, 0] += 1
            logits = torch.randn(5, 6, 11, generator=g) * (1 + step)
            entropy = torch.distributions.Categorical(logits=logits).entropy()
            assert torch.equal(ours(canvas, entropy.mean(dim=-1)), ref(canvas, logits))


def test_entropy_bound_acceptance_rule():
    e = torch.tensor([[0.5, 0.01, 0.02, 3.0, 0.05]])
    # sorted: 0.01, 0.02, 0.05, 0.5, 3.0; cumsum - current: 0, 0.01, 0.03, 0.08, 0.58
    assert entropy_bound_accept(e, 0.1).tolist() == [[True, True, True, False, True]]
    assert entropy_bound_accept(e, 0.02).tolist() == [[False, True, True, False, False]]
    assert entropy_bound_accept(e, 1e-9).tolist() == [[False, True, False, False, False]]  # at least one


def test_global_generator_matches_transformers(models):
    """Without generator= or seed=, both draw from torch's global generator."""
    hf, eng = models()
    p = prompts(eng, 2, 9)
    kw = dict(max_new_tokens=16, max_denoising_steps=5, eos_token_id=[1], pad_token_id=0)
    torch.manual_seed(123)
    ref = hf.generate(p, **kw)
    torch.manual_seed(123)
    ours = eng.generate(p, **kw)
    assert torch.equal(ours.sequences, ref.sequences)


@pytest.fixture(scope="module")
def frozen_decoder(tmp_path_factory):
    """A model whose decoder output is constant (its layer scalars are 0): the argmax canvas is stable from
    the second step on, so stability-based stopping runs through generate."""
    from hf_checkpoints import build_hf_model

    model = build_hf_model("odd", seed=3)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.layer_scalar.zero_()
    path = tmp_path_factory.mktemp("frozen")
    model.save_pretrained(path)
    return load_hf(path, torch.float32), dgemma.load(path, dtype=torch.float32)


@pytest.mark.parametrize("stability", [1, 2])
def test_stability_stopping_matches_transformers(frozen_decoder, stability):
    hf, eng = frozen_decoder
    p = prompts(eng, 2, 9)
    kw = dict(max_new_tokens=16, max_denoising_steps=8, stability_threshold=stability, confidence_threshold=10.0,
              eos_token_id=[1], pad_token_id=0)
    ref, ours = both(hf, eng, p, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.tokens_per_forward, ref.tokens_per_forward)
    # The argmax is constant, so a block stops once it has matched `stability` earlier steps.
    assert ours.steps_per_block == [[stability + 1] * 2] * 2
