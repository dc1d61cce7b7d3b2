"""The vision tower, its projector and images in the encoder against transformers' DiffusionGemma:
soft tokens, encoder+decoder logits with image placeholders, and generate() token for token."""

import pytest
import torch
from conftest import load_hf

import dgemma
from dgemma.errors import DgemmaError

IMAGE, BOI, EOI, VIDEO = 128, 127, 129, 130  # inside the tiny vocabulary (131)
VARIANTS = {
    # The checkpoint's own flags: plain, clipped linears + standardised features, images attending to themselves.
    "plain": dict(vision={}, bidir=None),
    "clipped_standardised": dict(vision=dict(use_clipped_linears=True, standardize=True), bidir=None),
    "bidirectional": dict(vision=dict(num_hidden_layers=2), bidir="vision"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from hf_checkpoints import VISION, build_hf_model

    made = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in made:
            v = VARIANTS[name]
            model = build_hf_model("odd", seed=4, text_overrides=dict(use_bidirectional_attention=v["bidir"]),
                                   vision_overrides=dict(VISION, **v["vision"]),
                                   config_overrides=dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
                                                         video_token_id=VIDEO))
            path = tmp_path_factory.mktemp(f"vision_{name}")
            model.to(dtype).save_pretrained(path)
            made[(name, dtype)] = (load_hf(path, dtype), dgemma.load(path, dtype=dtype))
        return made[(name, dtype)]

    return get


def image_patches(grids, seed=0, patch=16):
    """Random patches in [0, 1] of images of (width, height) patch grids, padded to one patch count
    (a multiple of 9) with position (-1, -1); and the soft-token count of each image."""
    g = torch.Generator().manual_seed(seed)
    n = max(w * h for w, h in grids)
    n = -(-n // 9) * 9 + 9  # always some padding
    pixels = torch.rand(len(grids), n, 3 * patch * patch, generator=g)
    positions = torch.full((len(grids), n, 2), -1, dtype=torch.long)
    for i, (w, h) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions[i, : w * h] = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1)
    return pixels, positions, [(w // 3) * (h // 3) for w, h in grids]


def prompt_with_images(counts, seed=1, vocab=131):
    g = torch.Generator().manual_seed(seed)
    ids = [2]
    for c in counts:
        ids += torch.randint(3, 120, (3,), generator=g).tolist() + [BOI] + [IMAGE] * c + [EOI]
    ids += torch.randint(3, 120, (4,), generator=g).tolist()
    types = [1 if t == IMAGE else 0 for t in ids]
    return torch.tensor([ids]), torch.tensor([types])


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_tokens_match_transformers(models, name, dtype):
    hf, eng = models(name, dtype)
    pixels, positions, counts = image_patches([(6, 3), (9, 6), (3, 3)])
    ref = hf.model.encoder.get_image_features(pixels.to(dtype), positions).pooler_output
    ours = eng.model.image_features(pixels.to(dtype), positions)
    assert ours.shape == ref.shape == (sum(counts), eng.config.hidden_size)
    assert ours.dtype == ref.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < tol, err


def hf_logits(hf, ids, types, pixels, positions, canvas):
    """One decoder pass after encoding ``ids`` with images, the encoder mask built as generate() builds it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    masks = hf.model.encoder.create_masks_for_generate(
        config=hf.config, inputs_embeds=torch.empty(1, ids.shape[1], 0, dtype=hf.dtype),
        attention_mask=torch.ones_like(ids, dtype=torch.bool), past_key_values=cache,
        position_ids=torch.arange(ids.shape[1])[None], mm_token_type_ids=types)
    out = hf(input_ids=ids, attention_mask=masks, past_key_values=cache, pixel_values=pixels,
             image_position_ids=positions, decoder_input_ids=canvas, position_ids=torch.arange(ids.shape[1])[None])
    return out.logits


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_with_images_match_transformers(models, name):
    hf, eng = models(name)
    pixels, positions, counts = image_patches([(6, 6), (3, 6)], seed=2)
    ids, types = prompt_with_images(counts)
    canvas = torch.randint(0, 131, (1, 8), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, ids, types, pixels, positions, canvas)
    cache = eng.encode(ids, pixel_values=pixels, image_position_ids=positions)
    ours = eng.denoise(cache, canvas)
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    # The images matter: the same prompt without them (placeholders embedded as tokens) scores differently.
    plain = eng.denoise(eng.encode(ids), canvas)
    assert ((plain - ref).norm() / ref.norm()).item() > 1e-3


def test_images_attend_to_themselves_whole_only_when_configured(models):
    """With use_bidirectional_attention = "vision" an image's first soft token sees its last one; with a
    causal config it does not. The soft tokens are given directly (the vision tower itself mixes all
    patches), and only the last one changes; the first image token's keys in the last layer tell."""
    for name, differs in (("bidirectional", True), ("plain", False)):
        _, eng = models(name)
        pixels, positions, counts = image_patches([(6, 6)], seed=5)
        ids, _ = prompt_with_images(counts)
        feats = eng.model.image_features(pixels, positions)
        changed = feats.clone()
        changed[-1] += 1.0
        keys = []
        for f in (feats, changed):
            cache = eng.new_cache(1, 64)
            eng.model.encode(ids, cache, None, f)
            keys.append(cache.read(eng.config.num_layers - 1)[0])
        first = int((ids[0] == IMAGE).nonzero()[0])
        assert (not torch.allclose(keys[0][..., first, :], keys[1][..., first, :])) == differs, name
        last_text = ids.shape[1] - 1  # after the image: sees it in both configurations
        assert not torch.allclose(keys[0][..., last_text, :], keys[1][..., last_text, :])


@pytest.mark.parametrize("name", ["plain", "bidirectional"])
def test_generate_with_images_matches_transformers(models, name):
    hf, eng = models(name)
    pixels, positions, counts = image_patches([(6, 3), (3, 3)], seed=6)
    ids, types = prompt_with_images(counts, seed=7)
    kw = dict(max_new_tokens=16, max_denoising_steps=6, eos_token_id=[1], pad_token_id=0)
    torch.manual_seed(11)
    ref = hf.generate(ids, pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types, **kw)
    ours = eng.generate(ids, pixel_values=pixels, image_position_ids=positions,
                        generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    typed = eng.generate(ids, pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types,
                         generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(typed.sequences, ref.sequences)


def test_image_argument_errors(models):
    _, eng = models("plain")
    pixels, positions, counts = image_patches([(6, 3)])
    ids, _ = prompt_with_images(counts)
    cases = [
        (dict(pixel_values=pixels), "pixel_values and image_position_ids go together"),
        (dict(pixel_values=pixels[..., :10], image_position_ids=positions), "expected a float tensor [images, patches, 768]"),
        (dict(pixel_values=pixels, image_position_ids=positions[:, :9]), "expected an integer tensor [1, 27, 2]"),
        (dict(pixel_values=pixels, image_position_ids=positions.float()), "expected an integer tensor"),
        (dict(pixel_values=pixels[:, :10], image_position_ids=positions[:, :10]), "positive multiple of 9 patches"),
        (dict(pixel_values=pixels, image_position_ids=positions + 20000), "image_position_ids must lie in [-1, 10240)"),
        # In range but no grid of these patches (transformers fails inside one_hot).
        (dict(pixel_values=pixels, image_position_ids=positions + 50), "the patch positions do not form a grid of 3 "
                                                                        "pooled 3x3 cells"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DgemmaError) as e:
            eng.encode(ids, **kwargs)
        assert message in str(e.value), (kwargs.keys(), str(e.value))
    extra = torch.cat((ids[:, :5], torch.full((1, 1), IMAGE), ids[:, 5:]), dim=1)  # one placeholder too many
    with pytest.raises(DgemmaError, match=r"the prompt has 3 image placeholder tokens \(id 128\) but the images give 2"):
        eng.encode(extra, pixel_values=pixels, image_position_ids=positions)
    with pytest.raises(DgemmaError, match=r"mm_token_type_ids has shape \[1, 3\]"):
        eng.encode(ids, mm_token_type_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(DgemmaError, match=r"must be 0 \(text\), 1 \(image\), 2 \(video\) or 3"):
        eng.encode(ids, mm_token_type_ids=torch.full_like(ids, 7))
    cache = eng.new_cache(1, 64)
    with pytest.raises(DgemmaError):
        eng.encode(ids, cache=cache, pixel_values=pixels, image_position_ids=positions[:, :9])
    assert cache.length == 0  # the cache is untouched by a refused call


def test_text_only_checkpoint_refuses_images():
    from dgemma.random_checkpoint import random_engine

    eng = random_engine("tiny", seed=1)
    pixels, positions, _ = image_patches([(3, 3)])
    with pytest.raises(DgemmaError, match="this model has no vision tower"):
        eng.encode(torch.tensor([[5, 6, 7]]), pixel_values=pixels, image_position_ids=positions)


def test_incomplete_or_absent_vision_tower(tmp_path, caplog):
    """A checkpoint missing part of its vision tower is refused by name; one with none loads text-only."""
    from safetensors.torch import load_file, save_file

    from hf_checkpoints import save_hf_checkpoint

    path = tmp_path / "ck"
    save_hf_checkpoint("odd", path, config_overrides=dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI))
    tensors = load_file(path / "model.safetensors")
    gone = "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(dgemma.CheckpointError, match=f"the vision tower is incomplete: missing tensor '{gone}'"):
        dgemma.load(path)
    save_file({k: v for k, v in tensors.items() if "vision" not in k}, path / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="dgemma"):
        eng = dgemma.load(path)
    assert "has a vision_config but no vision-tower tensors" in caplog.text
    pixels, positions, counts = image_patches([(3, 3)])
    with pytest.raises(DgemmaError, match="this model has no vision tower"):
        eng.encode(prompt_with_images(counts)[0], pixel_values=pixels, image_position_ids=positions)


def test_random_checkpoint_with_a_vision_tower_is_a_transformers_checkpoint(tmp_path):
    """dgemma's own writer (used by ``dgemma demo``): transformers loads its vision tower and computes the same
    soft tokens, so the demo's multimodal path is the model's."""
    from dgemma.random_checkpoint import TINY_VISION, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "v", "tiny", canvas_length=16, vision=TINY_VISION,
                                   image_token_ids=(20, 21, 22))
    hf, eng = load_hf(path, torch.float32), dgemma.load(path, dtype=torch.float32)
    pixels, positions, counts = image_patches([(6, 3), (3, 9)])
    ref = hf.model.encoder.get_image_features(pixels, positions).pooler_output
    ours = eng.model.image_features(pixels, positions)
    assert ours.shape == ref.shape == (sum(counts), eng.config.hidden_size)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert (eng.config.boi_token_id, eng.config.image_token_id, eng.config.eoi_token_id) == (20, 21, 22)


def prompt_with_video(frame_counts, seed=1):
    """A prompt as Gemma4Processor lays a video out: per frame, a timestamp (text tokens), then boi, the frame's
    soft-token placeholders and eoi; mm_token_type_ids 2 on the placeholders."""
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(3, 120, (3,), generator=g).tolist()
    for c in frame_counts:
        ids += torch.randint(3, 120, (2,), generator=g).tolist() + [BOI] + [VIDEO] * c + [EOI]
    ids += torch.randint(3, 120, (4,), generator=g).tolist()
    return torch.tensor([ids]), torch.tensor([[2 if t == VIDEO else 0 for t in ids]])


def hf_logits_with_video(hf, ids, types, frames, positions, canvas, placeholder=VIDEO):
    """transformers' DiffusionGemma has no video input; the reference is what Gemma 4 does with one: each
    frame through the same vision tower and projector (Gemma4Model.get_video_features equals
    get_image_features frame by frame), its soft tokens scattered over the video placeholders of the input
    embeddings, the encoder masked with mm_token_type_ids (2 = video) as for images."""
    from transformers import DynamicCache

    features = hf.model.encoder.get_image_features(frames, positions).pooler_output
    embeds = hf.model.encoder.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == placeholder)[..., None].expand_as(embeds), features.to(embeds.dtype))
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    masks = hf.model.encoder.create_masks_for_generate(
        config=hf.config, inputs_embeds=torch.empty(1, ids.shape[1], 0, dtype=hf.dtype),
        attention_mask=torch.ones_like(ids, dtype=torch.bool), past_key_values=cache,
        position_ids=torch.arange(ids.shape[1])[None], mm_token_type_ids=types)
    hf.model.encoder(inputs_embeds=embeds, attention_mask=masks, past_key_values=cache,
                     position_ids=torch.arange(ids.shape[1])[None], mm_token_type_ids=types)
    return hf(past_key_values=cache, decoder_input_ids=canvas).logits


@pytest.mark.parametrize("name", ["plain", "bidirectional"])
def test_logits_with_a_video_match_transformers_gemma4_video_path(models, name):
    hf, eng = models(name)
    # The reference construction itself reproduces transformers' own image path on an image prompt.
    pixels, pos, img_counts = image_patches([(6, 6), (3, 6)], seed=2)
    img_ids, img_types = prompt_with_images(img_counts)
    img_canvas = torch.randint(0, 131, (1, 8), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(hf_logits_with_video(hf, img_ids, img_types, pixels, pos, img_canvas, placeholder=IMAGE),
                          hf_logits(hf, img_ids, img_types, pixels, pos, img_canvas), rtol=0, atol=1e-5)
    frames, positions, counts = image_patches([(6, 3), (6, 3), (6, 3)], seed=8)  # three frames of one video
    ids, types = prompt_with_video(counts, seed=9)
    canvas = torch.randint(0, 131, (1, 8), generator=torch.Generator().manual_seed(3))
    ref = hf_logits_with_video(hf, ids, types, frames, positions, canvas)
    cache = eng.encode(ids, pixel_values_videos=frames, video_position_ids=positions)
    ours = eng.denoise(cache, canvas)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    # The frames matter, and so does the per-frame bidirectional block where the config asks for it.
    plain = eng.denoise(eng.encode(ids), canvas)
    assert ((plain - ref).norm() / ref.norm()).item() > 1e-3


def test_video_errors_name_the_problem(models):
    _, eng = models("plain")
    frames, positions, counts = image_patches([(6, 3), (6, 3)], seed=8)
    ids, _ = prompt_with_video(counts)
    with pytest.raises(DgemmaError, match="pixel_values_videos and video_position_ids go together"):
        eng.encode(ids, pixel_values_videos=frames)
    with pytest.raises(DgemmaError, match="the prompt has 4 video placeholder tokens .* but the videos give 2"):
        eng.encode(ids, pixel_values_videos=frames[:1], video_position_ids=positions[:1])
    with pytest.raises(DgemmaError, match=r"video_position_ids has shape \[2, 27\], expected an integer tensor"):
        eng.encode(ids, pixel_values_videos=frames, video_position_ids=positions[..., 0])
