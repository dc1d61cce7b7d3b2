"""generate() against transformers at the model's real step counts (9…48 denoising steps), on
checkpoints whose config.json names EOS/pad ids but whose generation_config.json does not, and in
states where every canvas position is accepted."""

import pytest
import torch
from conftest import load_hf

import dgemma

# 7 layers (the last one forced to full attention), a sliding window shorter than prompt + canvas,
# a 10-token canvas; seeds chosen so that EOS (id 1, named only in config.json) shows up in a block.
MODELS = {
    "odd7": ("odd", 1, dict(num_hidden_layers=7, sliding_window=12, layer_types=None)),
    "a4b7": ("a4b_scaled", 0, dict(num_hidden_layers=7, sliding_window=12)),
    "mha3": ("mha", 2, dict(num_hidden_layers=3, sliding_window=5)),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from hf_checkpoints import save_hf_checkpoint

    made = {}

    def get(name):
        if name not in made:
            arch, seed, overrides = MODELS[name]
            path = tmp_path_factory.mktemp(name)
            save_hf_checkpoint(arch, path, seed=seed, canvas_length=10, text_overrides=overrides)
            made[name] = (load_hf(path, torch.float32), dgemma.load(path, dtype=torch.float32))
        return made[name]

    return get


def run_both(hf, eng, ids, seed=1, **kw):
    torch.manual_seed(seed)
    hf_kw = dict(kw)
    if "entropy_bound" in hf_kw:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        hf_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(hf_kw.pop("entropy_bound")))
    ref = hf.generate(ids, **hf_kw)
    ours = eng.generate(ids, generator=torch.Generator().manual_seed(seed), **kw)
    return ref, ours


def prompt(eng, batch=1, length=23):
    return torch.randint(3, eng.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("steps", [9, 12, 16, 48])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_defaults_match_transformers(model, name, steps):
    """The plain call: no EOS/pad given, the checkpoint's generation_config.json names none."""
    hf, eng = model(name)
    ids = prompt(eng)
    ref, ours = run_both(hf, eng, ids, max_new_tokens=20, max_denoising_steps=steps)
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.tokens_per_forward, ref.tokens_per_forward)


def test_config_eos_does_not_stop_generation(model):
    """The regression behind the mismatch: EOS id 1 (config.json only) appears in a block and is kept,
    with the tokens after it, as transformers keeps them. The seed is the first whose block holds EOS before
    its last token (which seed that is depends on the CPU's floating-point summation order)."""
    hf, eng = model("odd7")
    assert eng.config.eos_token_ids == (1,) and eng.eos_token_ids == [] and eng.pad_token_id is None
    for seed in range(20):
        ref, ours = run_both(hf, eng, prompt(eng), seed=seed, max_new_tokens=10, max_denoising_steps=9)
        assert torch.equal(ours.sequences, ref.sequences), seed
        new = ours.new_tokens[0]
        if (new[:-1] == 1).any():
            break
    else:
        pytest.fail("no seed of 0..19 put EOS in the block")
    assert new.shape[0] == 10 and torch.equal(ours.tokens_per_forward, ref.tokens_per_forward)


@pytest.mark.parametrize("steps", [9, 16, 48])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_acceptance_matches_transformers(model, name, steps):
    """A bound so wide that every position is accepted at every step, and a cold schedule whose late
    steps accept every position of their own accord; batch of 2, EOS/pad given."""
    hf, eng = model(name)
    ids = prompt(eng, batch=2, length=17)
    for kw in (dict(entropy_bound=1e4), dict(t_max=1.0, t_min=0.01, entropy_bound=0.5)):
        ref, ours = run_both(hf, eng, ids, max_new_tokens=30, max_denoising_steps=steps, eos_token_id=[1, 2],
                             pad_token_id=0, **kw)
        assert torch.equal(ours.sequences, ref.sequences), kw
        assert torch.equal(ours.tokens_per_forward, ref.tokens_per_forward), kw


def test_full_acceptance_really_happens(model):
    """The states above are reached: every position accepted at some step of the cold schedule."""
    _, eng = model("odd7")
    seen = []
    ops = eng.model.ops
    original = ops.sample_step

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.accepted.all(dim=-1))
        return out

    ops.sample_step = spy
    try:
        eng.generate(prompt(eng, batch=2, length=17), seed=1, max_new_tokens=10, max_denoising_steps=48, t_max=1.0,
                     t_min=0.01, entropy_bound=0.5)
    finally:
        ops.sample_step = original
    assert len(seen) == 48 and torch.stack(seen).any() and not torch.stack(seen).all()


def test_generation_config_max_length_matches_transformers(tmp_path):
    """generation_config.json's max_length (no max_new_tokens) bounds the whole sequence, as in transformers; the
    call's max_new_tokens or max_length takes precedence; a max_length the prompt already fills is refused."""
    import json

    from hf_checkpoints import save_hf_checkpoint

    arch, seed, overrides = MODELS["odd7"]
    save_hf_checkpoint(arch, tmp_path, seed=seed, canvas_length=10, text_overrides=overrides)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"max_length": 41, "max_denoising_steps": 3}, f)  # no EOS: the whole budget runs
    hf, eng = load_hf(tmp_path, torch.float32), dgemma.load(tmp_path, dtype=torch.float32)
    ids = prompt(eng)  # 23 tokens: 18 new ones, 2 canvases of 10
    ref, ours = run_both(hf, eng, ids)
    assert ref.sequences.shape == (1, 43) and torch.equal(ours.sequences, ref.sequences)
    ref, ours = run_both(hf, eng, ids, max_new_tokens=5)
    assert ours.sequences.shape == (1, 33) and torch.equal(ours.sequences, ref.sequences)
    assert eng.generate(ids, max_length=24, max_denoising_steps=2, seed=0).sequences.shape == (1, 33)
    with pytest.raises(dgemma.DgemmaError, match=r"max_length 41 \(generation_config.json\) leaves no room for new "
                                                 r"tokens after the 41 tokens before them \(cache 0, prompt 41\)"):
        eng.generate(prompt(eng, length=41))
    with pytest.raises(dgemma.DgemmaError, match=r"max_length 20 leaves no room .* \(cache 0, prompt 23\)"):
        eng.generate(ids, max_length=20)
