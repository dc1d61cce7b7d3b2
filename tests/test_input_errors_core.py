"""Bad input to the core (caches, load() arguments, config.json, quantization_config, sharded indexes, images)
found by fuzzing: each gets a DgemmaError / ConfigError / CheckpointError naming the value and what was
expected, and leaves the engine and its caches as they were."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma.cache import KVCache
from dgemma.demo import write_demo_checkpoint
from dgemma.errors import CheckpointError, ConfigError, DgemmaError
from dgemma.formats import format_from_config
from dgemma.generation import denoise_block
from dgemma.random_checkpoint import write_random_checkpoint
from dgemma.sampler import GenerationSettings, make_sampler

FP8_GROUP = {"format": "float-quantized", "weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("input_errors_core") / "demo")


@pytest.fixture(scope="module")
def eng(demo):
    return dgemma.load(demo, dtype=torch.float32)


def _ids(t, seed=0):
    return torch.randint(3, 512, (1, t), generator=torch.Generator().manual_seed(seed))


def _copy(demo, tmp_path, edit_config=None):
    path = tmp_path / "ck"
    shutil.copytree(demo, path)
    if edit_config is not None:
        with open(path / "config.json") as f:
            raw = json.load(f)
        edit_config(raw)
        with open(path / "config.json", "w") as f:
            json.dump(raw, f)
    return path


# -- 1. truncation never goes back further than the rings keep ---------------------------------------------


def test_two_truncations_together_cannot_drop_more_than_rollback(eng):
    assert eng.config.sliding_window == 32
    ids, canvas = _ids(100), _ids(32, seed=1)
    cache = eng.new_cache(1, 200, rollback=4)
    eng.encode(ids, cache=cache)
    cache.truncate(96)
    with pytest.raises(DgemmaError, match=r"to 92: it has held up to 100 tokens .*\(rollback=4\), so it can be "
                                          r"truncated to 96 at the shortest"):
        cache.truncate(92)
    assert cache.length == 96 and cache.high_water == 100 and cache.min_length == 96
    # Truncate, encode fewer tokens than were dropped, truncate again: the rings were written up to 100.
    eng.encode(ids[:, 96:97], cache=cache)
    with pytest.raises(DgemmaError, match=r"held up to 100 tokens"):
        cache.truncate(93)
    assert cache.length == 97
    cache.truncate(96)  # within the spare slots: the cache still scores like a fresh encoding
    fresh = eng.encode(ids[:, :96], capacity=200)
    assert torch.equal(eng.denoise(cache, canvas), eng.denoise(fresh, canvas))


def test_an_undone_generation_restores_the_high_water_mark(eng):
    cache = eng.new_cache(1, 200, rollback=8)
    eng.encode(_ids(50), cache=cache)

    class Stop(Exception):
        pass

    def stream(ev):
        if ev.kind == "block":
            raise Stop

    with pytest.raises(Stop):  # 40 prompt tokens were encoded into the cache, then undone
        eng.generate(_ids(40, seed=2), cache=cache, stream=stream, max_new_tokens=64, max_denoising_steps=2)
    assert cache.length == 50 and cache.high_water == 50
    cache.truncate(42)
    with pytest.raises(DgemmaError, match=r"held up to 50 tokens"):
        cache.truncate(41)


def test_the_commit_pass_through_encode_view_raises_the_high_water_mark():
    from test_steps import engine as fused_engine  # reference ops with the fused head: FusedHeadStepper.commit

    eng = fused_engine(fused=True, canvas=16)
    settings = GenerationSettings(max_denoising_steps=2)
    cache = eng.new_cache(1, 60 + 16, rollback=16)
    window = eng.config.sliding_window
    ring = min(76, window - 1 + 16)
    assert 60 + 16 > ring  # the rings wrap
    eng.encode(_ids(60), cache=cache)
    canvas = _ids(16, seed=3)
    for _ in range(2):  # a block and its commit, rolled back (what the benchmark does)
        denoise_block(eng, cache, canvas, settings, make_sampler(eng, settings, torch.Generator().manual_seed(0)),
                      commit=True)
        assert cache.length == 76 and cache.high_water == 76
        cache.truncate(60)
    cache.truncate(60)
    eng.encode(_ids(9, seed=4), cache=cache)
    shortest = 76 - ring + window - 1
    with pytest.raises(DgemmaError, match=rf"held up to 76 tokens .* truncated to {shortest} at the shortest"):
        cache.truncate(shortest - 1)
    cache.truncate(shortest)


def test_truncation_is_refused_only_where_a_ring_has_overwritten_what_it_needs(eng):
    """A ring that never wrapped, or one as long as the cache, holds every position: any truncation is safe; so is
    truncating to 0. Each such cache then scores like a fresh encoding."""
    window = eng.config.sliding_window
    ids, canvas = _ids(60), _ids(32, seed=1)
    never_wrapped = eng.new_cache(1, 200, rollback=4)  # ring window - 1 + 4 = 35 slots
    eng.encode(ids[:, :20], cache=never_wrapped)
    never_wrapped.truncate(16)
    never_wrapped.truncate(12)  # 8 back in total, more than rollback, but nothing was overwritten
    assert never_wrapped.min_length == 0
    whole = eng.new_cache(1, 30)  # capacity 30 <= window - 1: the rings are as long as the cache
    assert window - 1 >= 30
    eng.encode(ids[:, :30], cache=whole)
    whole.truncate(5)
    wrapped = eng.new_cache(1, 200, rollback=4)
    eng.encode(ids, cache=wrapped)
    assert wrapped.min_length == 60 - (window - 1 + 4) + window - 1 == 56
    wrapped.truncate(0)  # nothing left to read
    eng.encode(ids[:, :12], cache=wrapped)
    for name, cache, n in (("never wrapped", never_wrapped, 12), ("whole", whole, 5), ("wrapped", wrapped, 12)):
        fresh = eng.encode(ids[:, :n], capacity=200)
        got, want = eng.denoise(cache, canvas), eng.denoise(fresh, canvas)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, float((got - want).abs().max()))


# -- 2. a cache built directly is checked, and checked against the engine ----------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float32", device="cpu"), r"cache dtype 'float32' is not valid: expected a floating torch.dtype"),
    (dict(dtype=torch.int64, device="cpu"), r"cache dtype torch.int64 is not valid"),
    (dict(dtype=torch.float32, device="garbage"), r"cache device 'garbage' is not a valid torch device"),
    (dict(dtype=torch.float32, device="meta"), r"cache device 'meta' is not supported: expected 'cpu'"),
    (dict(dtype=torch.float32, device=3.5), r"cache device 3.5 is not a valid torch device"),
])
def test_a_cache_built_directly_refuses_a_bad_dtype_or_device(eng, kwargs, message):
    with pytest.raises(DgemmaError, match=message):
        KVCache(eng.config, 1, 64, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cache_of_another_dtype_is_refused_by_the_engine(eng, dtype):
    cache = KVCache(eng.config, 1, 64, dtype=dtype, device="cpu")
    message = rf"cache dtype {dtype} does not match the engine's dtype torch.float32"
    with pytest.raises(DgemmaError, match=message):
        eng.encode(_ids(4), cache=cache)
    assert cache.length == 0 and not bool(cache.valid.any())
    with pytest.raises(DgemmaError, match=message):
        eng.denoise(cache, _ids(32))
    with pytest.raises(DgemmaError, match=message):
        eng.generate(_ids(4), cache=cache, max_new_tokens=8, max_denoising_steps=2)


# -- 3. load() arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch="4"), r"max_batch must be a positive integer or None, got '4'"),
    (dict(max_batch=0), r"max_batch must be a positive integer or None, got 0"),
    (dict(max_batch=2.5), r"max_batch must be a positive integer or None, got 2.5"),
    (dict(max_batch=True), r"max_batch must be a positive integer or None, got True"),
    (dict(max_context="8"), r"max_context must be a positive integer or None, got '8'"),
    (dict(max_context=0), r"max_context must be a positive integer or None, got 0"),
    (dict(check_finite="no"), r"check_finite must be True, False or None, got 'no'"),
    (dict(progress="yes"), r"progress must be True, False or None, got 'yes'"),
])
def test_load_refuses_bad_arguments(demo, kwargs, message):
    with pytest.raises(DgemmaError, match=message):
        dgemma.load(demo, **kwargs)


@pytest.mark.parametrize("path", [None, 5, b"/tmp"])
def test_load_refuses_a_path_that_is_not_a_path(path):
    with pytest.raises(DgemmaError, match=rf"path {path!r} is not a checkpoint directory path: expected a str or "
                                          r"os.PathLike"):
        dgemma.load(path)


# -- 4. config.json's special tokens lie in the vocabulary -------------------------------------------------


@pytest.mark.parametrize("key, value", [("pad_token_id", 100_000), ("bos_token_id", 512),
                                        ("eos_token_id", 100_000), ("eos_token_id", [1, 600])])
def test_config_special_tokens_outside_the_vocabulary_are_refused_at_load(demo, tmp_path, key, value):
    path = _copy(demo, tmp_path, lambda c: c["text_config"].update({key: value}))
    bad = value[-1] if isinstance(value, list) else value
    with pytest.raises(ConfigError, match=rf"config.json: text_config.{key} = {bad} is outside the vocabulary: "
                                          r"expected a token id in \[0, 512\) \(text_config.vocab_size 512\)"):
        dgemma.load(path)


# -- 5. compressed-tensors quantization_config ---------------------------------------------------------------


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {**FP8_GROUP, "format": ["float-quantized"]}}},
     r"quantization_config config_groups.g format \['float-quantized'\] is not supported: expected one of "
     r"'float-quantized'"),
    ({"quant_method": "compressed-tensors", "format": {"a": 1}, "config_groups": {"g": {"weights": {}}}},
     r"quantization_config config_groups.g format \{'a': 1\} is not supported: .*; the group takes "
     r".*quantization_config's own format"),
    ({"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:["], "config_groups": {"g": FP8_GROUP}},
     r"quantization_config ignore entry 're:\[' is not a valid regular expression"),
])
def test_bad_compressed_tensors_fields_are_config_errors(qc, message):
    with pytest.raises(ConfigError, match=message):
        format_from_config(qc, "config.json")


def test_a_bad_ignore_pattern_is_refused_at_load_even_where_unused(demo, tmp_path):
    # A dense checkpoint (no weight stored FP8), so is_ignored never runs: the pattern is checked at load.
    qc = {"quant_method": "compressed-tensors", "ignore": ["re:model\\.(["], "config_groups": {"g": FP8_GROUP}}
    path = _copy(demo, tmp_path, lambda c: c.update(quantization_config=qc))
    with pytest.raises(ConfigError, match=r"config.json: quantization_config ignore entry 're:model\\\\.\(\['"):
        dgemma.load(path)


# -- 6. sharded checkpoints ---------------------------------------------------------------------------------


def _sharded(tmp_path):
    return write_random_checkpoint(tmp_path / "sh", "tiny", seed=1, shards=2, canvas_length=32)


def _edit_weight_map(path, fn):
    p = f"{path}/model.safetensors.index.json"
    with open(p) as f:
        raw = json.load(f)
    fn(raw["weight_map"])
    with open(p, "w") as f:
        json.dump(raw, f)


def test_a_weight_map_entry_no_shard_holds_is_refused(tmp_path):
    path = _sharded(tmp_path)
    shard = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
    _edit_weight_map(path, lambda wm: wm.update({"extra.tensor": shard}))
    with pytest.raises(CheckpointError, match=rf"weight_map puts tensor 'extra.tensor' in {shard}, but no shard "
                                              r"holds it"):
        dgemma.load(path)


def test_a_weight_map_entry_naming_the_wrong_shard_is_refused(tmp_path):
    path = _sharded(tmp_path)
    first, second = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    key = next(iter(load_file(f"{path}/{first}")))
    _edit_weight_map(path, lambda wm: wm.update({key: second}))
    with pytest.raises(CheckpointError, match=rf"puts tensor '{key}' in {second}, but that shard does not hold it "
                                              rf"\(it is in {first}\)"):
        dgemma.load(path)


def test_one_shard_under_two_spellings_is_one_shard(tmp_path):
    path = _sharded(tmp_path)
    _edit_weight_map(path, lambda wm: wm.update({k: ("./" + v if i % 2 else v) for i, (k, v) in enumerate(wm.items())}))
    eng = dgemma.load(path)
    assert eng.generate(_ids(3), max_new_tokens=8, max_denoising_steps=2).sequences.shape == (1, 3 + 32)
    # A tensor really held by two shards is still refused.
    first, second = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    a, b = load_file(f"{path}/{first}"), load_file(f"{path}/{second}")
    key = next(iter(a))
    save_file({**b, key: a[key]}, f"{path}/{second}")
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' appears in both .*/{first} and .*/{second}"):
        dgemma.load(path)


# -- 7. images on the meta device ----------------------------------------------------------------------------


def test_an_image_on_the_meta_device_is_refused(eng):
    from dgemma.vision_inputs import expand_image_tokens, preprocess_images

    image = torch.zeros((3, 20, 20), device="meta")
    message = r"image torch.Tensor of shape \(3, 20, 20\) .* is on the meta device \(a tensor without data\)"
    with pytest.raises(DgemmaError, match=message):
        preprocess_images([image])
    with pytest.raises(DgemmaError, match=message):
        eng.generate([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "x"}]}],
                     max_new_tokens=8, max_denoising_steps=2)
    with pytest.raises(DgemmaError, match=r"token ids .* are on the meta device"):
        expand_image_tokens(torch.zeros(4, dtype=torch.long, device="meta"), [2])


# -- 7. third fuzzing pass: loading -------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,why", [("re:(.*)*X", "a repeat inside a repeat"), ("re:(a+)+b", "a repeat inside"),
                                         ("re:(a|ab)*c", "a repeat of alternatives"), ("re:(a)\\1", "a backreference"),
                                         ("re:(.{1,60}){1,60}Z", "a repeat inside a repeat"),
                                         ("re:(aa|a){1,60}b", "a repeat of alternatives"),
                                         ("re:.*.*.*.*.*.*X", "6 open-ended repeats")])
def test_ignore_patterns_that_can_backtrack_without_bound_are_refused(pattern, why):
    qc = {"quant_method": "compressed-tensors", "ignore": ["lm_head", pattern], "config_groups": {"g": FP8_GROUP}}
    with pytest.raises(ConfigError, match=f"ignore entry .*: {why}.*exponential time"):
        format_from_config(qc, "config.json")


def test_usual_ignore_patterns_are_accepted():
    qc = {"quant_method": "compressed-tensors", "config_groups": {"g": FP8_GROUP},
          "ignore": ["lm_head", "re:.*vision_tower.*", "re:.*layers\\.(0|1|2)\\..*", "re:.*(q|k|v)_proj$",
                     "re:.*model.*layers.*mlp.*experts.*", "re:model.layers.[0-9]+.mlp.experts.*", "re:(\\d{2}){3}",
                     "re:(?:model\\.)?lm_head", "re:.*mlp\\.experts\\.\\d+\\..*"]}
    fmt = format_from_config(qc, "config.json")
    assert fmt.is_ignored("model.vision_tower.x") and fmt.is_ignored("model.layers.1.mlp")
    assert not fmt.is_ignored("model.layers.3.mlp.down_proj")


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {**FP8_GROUP, "weights": {
        **FP8_GROUP["weights"], "symmetric": "false"}}}}, r"weights symmetric = 'false', expected true or false"),
])
def test_compressed_tensors_booleans_are_booleans(qc, message):
    with pytest.raises(ConfigError, match=message):
        format_from_config(qc, "config.json")


def test_a_sampler_config_that_is_not_an_object_is_refused(demo, tmp_path):
    path = _copy(demo, tmp_path)
    with open(path / "generation_config.json") as f:
        raw = json.load(f)
    raw["sampler_config"] = [0.2]
    with open(path / "generation_config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigError, match=r"generation_config.json: sampler_config = \[0.2\], expected an object"):
        dgemma.load(path)


@pytest.mark.parametrize("make,message", [
    (lambda: torch.rand(3, 40, 50).to_sparse(), "is a sparse_coo tensor; expected a dense one"),
    (lambda: torch.rand(3, 40, 50).to(torch.float8_e4m3fn), "dtype torch.float8_e4m3fn has an unsupported dtype"),
    (lambda: torch.zeros(3, 40, 50, dtype=torch.complex64), "dtype torch.complex64 has an unsupported dtype"),
    (lambda: torch.quantize_per_tensor(torch.rand(3, 40, 50), 0.01, 0, torch.quint8),
     "dtype torch.quint8 has an unsupported dtype"),
])
def test_image_tensors_numpy_cannot_hold_are_refused(make, message):
    from dgemma.vision_inputs import load_image

    with pytest.raises(DgemmaError, match=message):
        load_image(make())


def test_a_checkpoint_directory_whose_name_is_not_utf8_reads_its_tokenizer(demo, tmp_path):
    name = os.fsdecode(b"ck\xffpt")
    path = os.path.join(os.fsdecode(bytes(tmp_path)), name)
    shutil.copytree(demo, path)
    eng = dgemma.load(path, dtype=torch.float32)
    assert eng.tokenizer.encode("hello") == dgemma.load(demo, dtype=torch.float32).tokenizer.encode("hello")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_naming_both(demo, tmp_path):
    path = _copy(demo, tmp_path)
    with open(path / "tokenizer.json") as f:
        tok = json.load(f)
    eng = dgemma.load(path, dtype=torch.float32)
    tok["added_tokens"].append({"id": eng.config.vocab_size, "content": "<big>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    with open(path / "tokenizer.json", "w") as f:
        json.dump(tok, f)
    eng = dgemma.load(path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=rf"tokenizer.json has {eng.config.vocab_size + 1} token ids but "
                                              rf"config.json's vocab_size is {eng.config.vocab_size}"):
        eng.generate("hello", max_new_tokens=4, max_denoising_steps=2)


@pytest.mark.parametrize("value,message", [(5, r"max_context 5 leaves no room for an answer: .* \(33\)"),
                                           (10**6, r"max_context 1000000 exceeds max_position_embeddings")])
def test_a_max_context_the_model_cannot_run_is_refused_before_loading(demo, value, message):
    with pytest.raises(DgemmaError, match=message):
        dgemma.load(demo, max_context=value)


def test_images_are_preprocessed_with_the_models_pooling(demo, tmp_path):
    """A checkpoint whose vision tower pools 2 x 2 patches (pooling has no weights): images are cut into patches
    and counted in soft tokens with its sizes, not Gemma 4's default 3 x 3."""
    import numpy as np

    path = _copy(demo, tmp_path, lambda c: c["vision_config"].update(pooling_kernel_size=2))
    eng = dgemma.load(path, dtype=torch.float32)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "x"}]}]
    out = eng.generate(messages, max_new_tokens=4, max_denoising_steps=2, max_image_tokens=70, seed=0)
    from dgemma.vision_inputs import preprocess_images

    soft = preprocess_images([image], max_soft_tokens=70, pooling_kernel_size=2).num_soft_tokens_per_image[0]
    placeholders = int((out.sequences[0] == eng.config.image_token_id).sum())
    assert placeholders == soft
