"""dgemma.vision_inputs against transformers 5.23's Gemma 4 processors (the reference; a test-only dependency).

Images: Gemma4ImageProcessorPil, run as is. Prompts: a real Gemma4Processor over a tiny tokenizer built here with
Gemma 4's vision tokens. Video: frame sampling and decoding against transformers' PyAV reader; pixels against
Gemma4VideoProcessor, which needs torchvision: where torchvision is missing, the processor's own module is run
with a stand-in for the two torchvision kernels it calls (see ``video_reference``). Every comparison with the
reference is exact (torch.equal / array_equal); the one tolerance checks where dgemma deliberately differs
(float images, which transformers 5.23 divides by 255 twice).
"""

from __future__ import annotations

import base64
import enum
import io
import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest
import torch

from dgemma.errors import DgemmaError
from dgemma import vision_inputs as vi

BUDGETS = vi.SUPPORTED_SOFT_TOKENS
# (height, width): odd sizes, extreme aspect ratios, a 1x1 image, and 768x768, which the 280 budget keeps as is.
SIZES = [(37, 211), (480, 640), (1, 1), (3000, 20), (20, 3000), (768, 768)]
VISION_SPECIALS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                   "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
VIDEO_FPS, VIDEO_FRAMES, VIDEO_W, VIDEO_H = 10, 35, 96, 64  # 3.5 s


@pytest.fixture(scope="module")
def Image():
    return pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def av():
    return pytest.importorskip("av")


@pytest.fixture(scope="module")
def ref_images(Image):
    """max_soft_tokens -> the reference image processor."""
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return {b: Gemma4ImageProcessorPil(max_soft_tokens=b) for b in BUDGETS}


def rng_image(rng, height, width, channels=3) -> np.ndarray:
    return rng.randint(0, 256, (height, width, channels), dtype=np.uint8)


def assert_same(ours: vi.ImageInputs, ref) -> None:
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert torch.equal(ours.image_position_ids, ref["image_position_ids"])
    assert list(ours.num_soft_tokens_per_image) == ref["num_soft_tokens_per_image"].tolist()


def check(ref_images, ours_input, ref_input=None, budget=280, **ref_kwargs) -> vi.ImageInputs:
    ours = vi.preprocess_images(ours_input, max_soft_tokens=budget)
    ref = ref_images[budget](ours_input if ref_input is None else ref_input, return_tensors="pt", **ref_kwargs)
    assert_same(ours, ref)
    return ours


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("budget", BUDGETS)
def test_images_match_reference_for_every_budget(Image, ref_images, budget):
    rng = np.random.RandomState(budget)
    for height, width in SIZES:
        rgb = rng_image(rng, height, width)
        ours = check(ref_images, Image.fromarray(rgb), budget=budget)
        assert ours.pixel_values.dtype == torch.float32 and ours.image_position_ids.dtype == torch.int64
        assert ours.pixel_values.shape == (1, budget * 9, 768) and ours.image_position_ids.shape == (1, budget * 9, 2)
        n = ours.num_soft_tokens_per_image[0]
        assert 0 < n <= budget and n == vi.num_image_soft_tokens(height, width, max_soft_tokens=budget)
        assert (ours.image_position_ids[0, n * 9:] == -1).all() and (ours.pixel_values[0, n * 9:] == 0).all()
        assert (ours.image_position_ids[0, : n * 9] >= 0).all()
        if height not in (1, 3, 4):  # (1, 1, 3) would read as channels-first, in transformers and here
            check(ref_images, rgb, budget=budget)


def test_target_sizes_match_reference_formula():
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    rng = np.random.RandomState(0)
    sizes = [(1, 1), (1, 100_000), (100_000, 1), (2, 3), (47, 48), (48, 48), (1080, 1920), (4000, 3000)]
    sizes += [tuple(int(x) for x in rng.randint(1, 5000, 2)) for _ in range(300)]
    for budget in BUDGETS:
        for patch, pool in ((16, 3), (14, 2)):
            for height, width in sizes:
                assert vi.aspect_ratio_preserving_size(height, width, max_soft_tokens=budget, patch_size=patch,
                                                       pooling_kernel_size=pool) == \
                    get_aspect_ratio_preserving_size(height, width, patch, budget * pool**2, pool)


def test_other_patch_and_pooling_sizes_match_reference(Image):
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rgb = rng_image(np.random.RandomState(1), 101, 57)
    ours = vi.preprocess_images(rgb, max_soft_tokens=140, patch_size=14, pooling_kernel_size=2)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=140, patch_size=14, pooling_kernel_size=2)(rgb, return_tensors="pt")
    assert_same(ours, ref)


def test_batches_pad_each_image(Image, ref_images):
    rng = np.random.RandomState(2)
    images = [rng_image(rng, 37, 211), Image.fromarray(rng_image(rng, 300, 200)), rng_image(rng, 640, 480)]
    ours = check(ref_images, images, budget=70)
    assert len(set(ours.num_soft_tokens_per_image)) == 3
    stacked = np.stack([rng_image(rng, 50, 70) for _ in range(3)])  # a 4-D array is a batch
    check(ref_images, stacked, budget=70)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "L", "P", "P+transparency", "1", "CMYK", "I;16", "F",
                                  "YCbCr", "RGBX"])
def test_pil_modes_convert_as_reference(Image, ref_images, mode):
    rng = np.random.RandomState(3)
    rgba = Image.fromarray(rng_image(rng, 41, 67, 4), "RGBA")
    if mode == "P+transparency":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    elif mode == "I;16":
        image = Image.fromarray(rng.randint(0, 65536, (41, 67)).astype(np.uint16))
    else:
        image = rgba.convert(mode)
    assert image.mode == mode.split("+")[0]
    check(ref_images, image, budget=70)


def test_rgba_composites_onto_white(Image):
    rgba = np.zeros((48, 48, 4), dtype=np.uint8)  # fully transparent black
    assert (vi.load_image(Image.fromarray(rgba, "RGBA")) == 255).all()
    assert (vi.load_image(rgba) == 255).all()


def write_files(Image, tmp_path, rng) -> dict[str, pathlib.Path]:
    rgba = Image.fromarray(rng_image(rng, 45, 77, 4), "RGBA")
    files = {"png": tmp_path / "a.png", "gif": tmp_path / "b.gif", "jpg": tmp_path / "c.jpg"}
    rgba.save(files["png"])  # with alpha: the path route drops it, like transformers' load_image
    palette = rgba.convert("RGB").quantize(8)
    palette.save(files["gif"], transparency=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees; transformers applies it for files
    Image.fromarray(rng_image(rng, 30, 90)).save(files["jpg"], exif=exif, quality=90)
    return files


def test_paths_and_bytes_match_reference(Image, ref_images, tmp_path):
    files = write_files(Image, tmp_path, np.random.RandomState(4))
    for name, path in files.items():
        data = path.read_bytes()
        ours = check(ref_images, str(path), budget=140)
        b64 = base64.b64encode(data).decode()  # transformers reads encoded images as base64 strings
        for form in (path, data, bytearray(data), memoryview(data)):
            same = vi.preprocess_images(form, max_soft_tokens=140)
            assert torch.equal(same.pixel_values, ours.pixel_values), (name, type(form))
        assert_same(vi.preprocess_images(data, max_soft_tokens=140), ref_images[140](b64, return_tensors="pt"))
    rotated = vi.load_image(files["jpg"])
    assert rotated.shape == (90, 30, 3)


def test_arrays_and_tensors_match_reference(ref_images):
    rng = np.random.RandomState(5)
    hwc = rng_image(rng, 53, 97)
    rgba = rng_image(rng, 53, 97, 4)
    grey = rng_image(rng, 53, 97, 1)
    cases = [hwc, np.moveaxis(hwc, -1, 0).copy(), rgba, np.moveaxis(rgba, -1, 0), grey, np.moveaxis(grey, -1, 0),
             hwc.astype(np.int64), hwc.astype(np.uint16), torch.from_numpy(hwc),
             torch.from_numpy(hwc).permute(2, 0, 1), torch.from_numpy(rgba).to(torch.int16)]
    for case in cases:
        check(ref_images, case, budget=70)
    # a 2-D array is a grey image here; transformers takes it as (H, W, 1)
    assert_same(vi.preprocess_images(grey[..., 0], max_soft_tokens=70), ref_images[70](grey, return_tensors="pt"))
    # an RGB image 1 or 3 pixels high needs its layout stated, as transformers needs input_data_format
    for height in (1, 3):
        tiny = rng_image(rng, height, 5)
        ref = ref_images[280](tiny, input_data_format="channels_last", return_tensors="pt")
        assert_same(vi.preprocess_images(tiny, layout="HWC"), ref)
        assert np.array_equal(vi.load_image(tiny, layout="HWC"), tiny)


def test_float_images_are_read_as_unit_range(ref_images):
    rng = np.random.RandomState(6)
    unit = rng.rand(61, 83, 3)
    alpha = rng.rand(61, 83, 4).astype(np.float32)
    for image in (unit.astype(np.float32), unit, np.moveaxis(unit, -1, 0), alpha, torch.from_numpy(unit).half(),
                  torch.from_numpy(unit).to(torch.bfloat16)):
        as_array = image.float().numpy() if isinstance(image, torch.Tensor) else image
        layout = "CHW" if as_array.shape[0] == 3 else "HWC"
        hwc = np.moveaxis(as_array, 0, -1) if layout == "CHW" else as_array
        if hwc.shape[-1] == 4:
            a = hwc[..., 3:4] / 1.0
            hwc = (a * hwc[..., :3] + (1 - a) * 1.0).astype(hwc.dtype)
        quantised = (hwc.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        check(ref_images, image, ref_input=quantised, budget=70)
    # transformers divides float input by 255 twice; dgemma keeps it in [0, 1] (float32 rounding of 1/255 twice)
    ours = vi.preprocess_images(unit.astype(np.float32), max_soft_tokens=70).pixel_values
    ref = ref_images[70](unit.astype(np.float32), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ref * 255, ours, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def processor(ref_images, tmp_path_factory):
    """A real Gemma4Processor over a tiny tokenizer that has Gemma 4's vision tokens."""
    from chat_fixture import build_tokenizer
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    tok = build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in [*VISION_SPECIALS.values(), "<|video|>"]])
    path = tmp_path_factory.mktemp("vision_tokenizer")
    tok.save(str(path / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                     unk_token="<unk>", extra_special_tokens=VISION_SPECIALS)
    check_class = ProcessorMixin.check_argument_for_proper_class

    def check_but_video(self, name, arg):
        # The processor checks its video processor against the video processor registry, which needs
        # torchvision; no video goes through this processor object (see video_reference).
        return None if name == "video_processor" else check_class(self, name, arg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", check_but_video)
        proc = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                               image_processor=Gemma4ImageProcessorPil(), tokenizer=hf_tok,
                               video_processor=object.__new__(BaseVideoProcessor))
    return proc, str(path)


def test_vision_tokens_from_tokenizer(processor):
    from dgemma.tokenizer import Tokenizer

    proc, path = processor
    tokens = vi.VisionTokens.from_tokenizer(Tokenizer(path))
    assert (tokens.image_id, tokens.boi_id, tokens.eoi_id, tokens.video_id) == \
        (proc.image_token_id, proc.tokenizer.convert_tokens_to_ids("<|image>"),
         proc.tokenizer.convert_tokens_to_ids("<image|>"), proc.video_token_id)
    assert (tokens.image, tokens.boi, tokens.eoi, tokens.video) == \
        (proc.image_token, proc.boi_token, proc.eoi_token, proc.video_token)
    assert vi.GEMMA4_VISION_TOKENS.image_id == 258_880 and vi.GEMMA4_VISION_TOKENS.video_id == 258_884


@pytest.mark.parametrize("budget", [70, 280])
def test_image_prompt_matches_processor(Image, processor, budget):
    from dgemma.tokenizer import Tokenizer

    proc, path = processor
    tokens = vi.VisionTokens.from_tokenizer(Tokenizer(path))
    rng = np.random.RandomState(7)
    images = [rng_image(rng, 37, 211), Image.fromarray(rng_image(rng, 480, 640))]
    prompt = "The sky <|image|> is blue<|image|>\nWhat is the weather?"
    ref = proc(text=[prompt], images=[images], max_soft_tokens=budget, return_tensors="pt")
    ours = vi.preprocess_images(images, max_soft_tokens=budget)
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert torch.equal(ours.image_position_ids, ref["image_position_ids"])

    replacements = [proc.replace_image_token({"num_soft_tokens_per_image": list(ours.num_soft_tokens_per_image)}, i)
                    for i in range(2)]
    text = vi.expand_image_tokens(prompt, ours, tokens=tokens)
    assert text == proc.get_text_with_replacements([prompt], replacements)[0][0]
    assert text.count("<|image|>") == sum(ours.num_soft_tokens_per_image)

    ref_ids = ref["input_ids"][0].tolist()
    assert proc.tokenizer(text)["input_ids"] == ref_ids
    assert vi.expand_image_tokens(proc.tokenizer(prompt)["input_ids"], ours, tokens=tokens) == ref_ids
    assert vi.expand_image_tokens(torch.tensor(proc.tokenizer(prompt)["input_ids"]), ours.num_soft_tokens_per_image,
                                  tokens=tokens) == ref_ids
    assert vi.mm_token_type_ids(ref_ids, tokens=tokens) == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(vi.mm_token_type_ids(ref["input_ids"], tokens=tokens), ref["mm_token_type_ids"])


def test_video_prompt_matches_processor(processor):
    from transformers.video_utils import VideoMetadata

    from dgemma.tokenizer import Tokenizer

    proc, path = processor
    tokens = vi.VisionTokens.from_tokenizer(Tokenizer(path))
    frames = np.zeros((4, 48, 48, 3), dtype=np.uint8)
    fps, indices = 10.0, [0, 11, 615, 35_999]  # 0 s, 1.1 s, 61.5 s (01:01) and 3599.9 s (59:59)
    video = vi.Video(frames, tuple(i / fps for i in indices))
    short = vi.Video(frames[:1], (0.0,))
    videos = vi.preprocess_video([video, short], max_soft_tokens=70)
    n = vi.num_image_soft_tokens(48, 48, max_soft_tokens=70)  # 48x48 is upscaled to 384x384: 64 soft tokens
    assert videos.num_soft_tokens_per_video == (n, n) == (64, 64) and videos.num_frames_per_video == (4, 1)
    metadata = [VideoMetadata(total_num_frames=36_000, fps=fps, frames_indices=indices),
                VideoMetadata(total_num_frames=1, fps=fps, frames_indices=[0])]
    video_inputs = {"num_soft_tokens_per_video": list(videos.num_soft_tokens_per_video), "video_metadata": metadata}
    image_inputs = {"num_soft_tokens_per_image": [2]}
    prompt = "Compare <|video|> with <|image|> and\n<|video|>."
    ref_text = proc.get_text_with_replacements(
        [prompt], [proc.replace_image_token(image_inputs, 0)],
        [proc.replace_video_token(video_inputs, i) for i in range(2)])[0][0]
    text = vi.expand_video_tokens(vi.expand_image_tokens(prompt, [2], tokens=tokens), videos, tokens=tokens)
    assert text == ref_text
    frame = "<|image>" + "<|video|>" * n + "<image|>"
    assert text.startswith(f"Compare 00:00 {frame} 00:01 {frame} 01:01 {frame} 59:59 {frame} with <|image>")
    assert text.endswith(f"and\n00:00 {frame}.")
    assert vi.expand_image_tokens(vi.expand_video_tokens(prompt, videos, tokens=tokens), [2], tokens=tokens) == text
    ids = proc.tokenizer(text)["input_ids"]
    assert vi.mm_token_type_ids(ids, tokens=tokens) == proc.create_mm_token_type_ids([ids])[0]
    assert vi.mm_token_type_ids(ids, tokens=tokens).count(vi.VIDEO_TOKEN_TYPE) == 5 * n


# ------------------------------------------------------------------------------------------------ video


def write_video(av, path, container_format=None) -> None:
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = VIDEO_W, VIDEO_H, "yuv420p"
        for i in range(VIDEO_FRAMES):
            frame = np.zeros((VIDEO_H, VIDEO_W, 3), dtype=np.uint8)
            frame[..., 0] = i * 7
            frame[..., 1] = np.arange(VIDEO_W)[None, :] * 2
            frame[..., 2] = np.arange(VIDEO_H)[:, None] * 3
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def video_files(av, tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    write_video(av, root / "clip.mp4")
    write_video(av, root / "clip.mkv")  # Matroska stores no frame count
    return root / "clip.mp4", root / "clip.mkv"


def test_load_video_samples_one_frame_per_second(video_files):
    pytest.importorskip("transformers")
    from transformers.video_utils import load_video as hf_load_video

    mp4, mkv = video_files
    video = vi.load_video(mp4)
    assert video.frames.shape == (3, VIDEO_H, VIDEO_W, 3) and video.frames.dtype == np.uint8
    assert video.timestamps == (0.0, 1.1, 2.3)  # frames 0, 11, 23: int(35 / 10 * 1) = 3 frames, i * 35 // 3
    ref_frames, ref_meta = hf_load_video(str(mp4), fps=1, backend="pyav")
    assert np.array_equal(video.frames, ref_frames)
    assert list(video.timestamps) == [float(t) for t in ref_meta.timestamps]
    assert np.array_equal(vi.load_video(mp4.read_bytes()).frames, video.frames)
    assert np.array_equal(vi.load_video(str(mkv)).frames, video.frames)
    assert vi.load_video(mkv).timestamps == video.timestamps

    capped = vi.load_video(mp4, fps=4, max_frames=5)  # 14 frames at 4 fps, capped to 5 spread over the clip
    ref_frames, ref_meta = hf_load_video(str(mp4), num_frames=5, backend="pyav")
    assert np.array_equal(capped.frames, ref_frames)
    assert list(capped.timestamps) == [float(t) for t in ref_meta.timestamps] == [0.0, 0.7, 1.4, 2.1, 2.8]
    assert len(vi.load_video(mp4, fps=100).frames) == VIDEO_FRAMES  # never more than the stream has
    assert vi.sample_frame_indices(3600, 30.0) == [i * 3600 // 60 for i in range(60)]  # 2 minutes: capped at 60


def test_a_raw_stream_without_a_frame_count_is_decoded(av, tmp_path):
    """An H.264 elementary stream has no frame count and cannot seek: its packets are counted, then the file is
    opened again to decode (a rewind failed with 'Operation not permitted')."""
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(25):
            frame = np.full((48, 64, 3), i * 9, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = vi.load_video(path, fps=1000)  # a raw stream states no rate: FFmpeg guesses one; every frame kept
    assert video.frames.shape == (25, 48, 64, 3)
    assert abs(int(video.frames[24].mean()) - 24 * 9) <= 3  # the last frame reached
    assert np.array_equal(vi.load_video(path.read_bytes(), fps=1000).frames, video.frames)


def test_a_long_video_is_refused_from_its_header(av, tmp_path, monkeypatch):
    """max_seconds (the chat prompt's 60 s): a video whose last kept frame would fall at or past it is refused before
    any frame is decoded (a 10-minute video was decoded for 590 s of frames first), naming its length."""
    path = tmp_path / "long.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(90):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    decoded = []
    original = vi._decode_frames
    monkeypatch.setattr(vi, "_decode_frames", lambda *a: decoded.append(1) or original(*a))
    with pytest.raises(DgemmaError, match=r"video '.*long.mp4' is 90 s long; the model takes videos of at most 60 "
                                          r"seconds \(1 frame per second\): trim it first"):
        vi.load_video(path, max_seconds=60)
    assert not decoded
    assert len(vi.load_video(path, max_seconds=100).frames) == 60  # capped at 60 frames, spread over 90 s
    with pytest.raises(DgemmaError, match=r"max_seconds=0 is not valid; expected a positive number of seconds"):
        vi.load_video(path, max_seconds=0)


def test_extreme_sampling_rates_do_not_overflow():
    assert vi.sample_frame_indices(100, 30.0, fps=1e308) == [i * 100 // 60 for i in range(60)]
    assert vi.sample_frame_indices(100, 1e-308) == [i * 100 // 60 for i in range(60)]
    assert vi.sample_frame_indices(100, 1e308) == [0]


class _InterpolationMode(enum.Enum):
    BICUBIC = "bicubic"


def _torchvision_resize(image, size, interpolation, antialias=True):
    # torchvision.transforms.v2.functional.resize_image for a uint8 CPU tensor with BICUBIC: no dtype cast
    # (_do_native_uint8_resize_on_cpu is true for bicubic), interpolate(align_corners=False, antialias) on
    # the tensor viewed as (-1, C, H, W).
    assert image.dtype == torch.uint8 and image.device.type == "cpu" and interpolation.value == "bicubic"
    shape = image.shape
    out = torch.nn.functional.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode="bicubic",
                                          align_corners=False, antialias=antialias)
    return out.reshape(*shape[:-3], *out.shape[-3:])


def _torchvision_normalize(self, image, mean, std, inplace=False, **kwargs):
    # torchvision.transforms.v2.functional.normalize_image.
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


@pytest.fixture(scope="module")
def video_reference():
    """fn(list of (T, H, W, 3) uint8 arrays, budget) -> Gemma4VideoProcessor's output for those frames.

    Runs the processor's own code: BaseVideoProcessor._prepare_input_videos, Gemma4VideoProcessor._preprocess
    (resize call, fused rescale/normalize of the torchvision backend, patches, positions, padding, concatenation).
    Without torchvision its module cannot be imported, so it is executed with ``tvF`` bound to the two kernels
    above, transcribed from torchvision for this input (uint8, CPU, bicubic).
    """
    pytest.importorskip("transformers")
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.video_processing_utils import BaseVideoProcessor

    name = "transformers.models.gemma4.video_processing_gemma4"
    origin = importlib.util.find_spec(name).origin
    module = types.ModuleType(name)
    module.__file__, module.__package__ = origin, "transformers.models.gemma4"
    module.tvF = types.SimpleNamespace(InterpolationMode=_InterpolationMode, resize=_torchvision_resize)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, name, module)  # its docstring decorators look the module up
        with open(origin, encoding="utf-8") as f:
            exec(compile(f.read(), origin, "exec"), module.__dict__)
    processor_class = module.Gemma4VideoProcessor

    class Processor:
        aspect_ratio_preserving_resize = processor_class.aspect_ratio_preserving_resize
        rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
        _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor
        normalize = _torchvision_normalize

    def run(videos, budget):
        stub = Processor()
        # do_convert_rgb only calls torchvision's grayscale_to_rgb, a no-op for RGB frames
        tensors = BaseVideoProcessor._prepare_input_videos(stub, videos, do_convert_rgb=False)
        return processor_class._preprocess(
            stub, tensors, do_resize=True, resample=module.tvF.InterpolationMode.BICUBIC, do_rescale=True,
            rescale_factor=1 / 255, do_normalize=True, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0),
            return_tensors="pt", patch_size=16, max_soft_tokens=budget, pooling_kernel_size=3)

    return run


def assert_same_video(ours: vi.VideoInputs, ref) -> None:
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])
    assert torch.equal(ours.video_position_ids, ref["video_position_ids"])
    assert list(ours.num_frames_per_video) == torch.as_tensor(ref["num_frames_per_video"]).tolist()
    assert list(ours.num_soft_tokens_per_video) == torch.as_tensor(ref["num_soft_tokens_per_video"]).tolist()


@pytest.mark.parametrize("budget", BUDGETS)
def test_preprocess_video_matches_reference(video_files, video_reference, budget):
    video = vi.load_video(video_files[0])
    rng = np.random.RandomState(budget)
    odd = vi.Video(rng_image(rng, 2 * 37, 211).reshape(2, 37, 211, 3), (0.0, 1.0))
    size = vi.aspect_ratio_preserving_size(300, 400, max_soft_tokens=budget)
    assert vi.aspect_ratio_preserving_size(*size, max_soft_tokens=budget) == size  # kept as is: no resize
    exact = vi.Video(rng_image(rng, *size)[None], (0.0,))
    ours = vi.preprocess_video([video, odd, exact], max_soft_tokens=budget)
    assert_same_video(ours, video_reference([video.frames, odd.frames, exact.frames], budget))
    assert ours.pixel_values_videos.shape == (6, budget * 9, 768) and ours.pixel_values_videos.dtype == torch.float32
    assert ours.video_position_ids.dtype == torch.int64 and ours.timestamps[1] == (0.0, 1.0)
    assert ours.num_frames_per_video == (3, 2, 1)
    rows, cols = size[0] // 16, size[1] // 16
    assert torch.equal(ours.video_position_ids[5, rows * cols - 1], torch.tensor([cols - 1, rows - 1]))


def test_preprocess_video_matches_torchvision_processor(video_files):
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor
    from transformers.video_utils import VideoMetadata

    video = vi.load_video(video_files[0])
    metadata = VideoMetadata(total_num_frames=VIDEO_FRAMES, fps=float(VIDEO_FPS), frames_indices=[0, 11, 23])
    for budget in (70, 280):
        ref = Gemma4VideoProcessor()(video.frames, video_metadata=[metadata], do_sample_frames=False,
                                     max_soft_tokens=budget, return_tensors="pt")
        assert_same_video(vi.preprocess_video(video, max_soft_tokens=budget), ref)


# ------------------------------------------------------------------------------------------------ errors


def test_base64_strings_and_data_urls_decode_like_the_bytes(Image):
    """As transformers' load_image: a string that is no file and decodes as base64 (64 characters or more), or a
    data:image URL, is the encoded image; a short string stays a (missing) path."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)).save(buf, format="PNG")
    raw = buf.getvalue()
    want = vi.load_image(raw)
    text = base64.b64encode(raw).decode()
    assert np.array_equal(vi.load_image(text), want)
    assert np.array_equal(vi.load_image("data:image/png;base64," + text), want)
    assert np.array_equal(vi.load_image(text[:40] + "\n" + text[40:]), want)  # line-wrapped base64
    with pytest.raises(DgemmaError, match=r"image file 'QUFB' does not exist"):
        vi.load_image("QUFB")
    assert np.array_equal(vi.load_image(" DATA:IMAGE/PNG;BASE64," + text), want)  # as the scheme is written
    path_like = "/tmp/" + "abcd" * 20  # base64 characters only, but a path: a missing file
    with pytest.raises(DgemmaError, match=r"image file '/tmp/abcdabcd.*' does not exist$"):
        vi.load_image(path_like)
    with pytest.raises(DgemmaError, match=r"image file 'abcdabcd.*' does not exist, nor is it a base64 image "
                                          r"\(cannot decode image bytes"):
        vi.load_image("abcd" * 20)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(Image, tmp_path, monkeypatch):
    """An encoded image whose header declares more than MAX_DECODED_PIXELS is refused from its header: a 1-bit PNG
    of a few KB declaring 151 Mpx took 2.4 GB to decode (Pillow only warns below twice its limit)."""
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.new("1", (12288, 12288)).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 100_000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or load(self))
    for source, what in ((data, "image bytes"), (path, "image file")):
        with pytest.raises(DgemmaError, match=rf"{what} .* declares 12288x12288 pixels \(151 Mpx\), more than "
                                              r"89 Mpx"):
            vi.load_image(source)
    assert loads == []  # refused from the header: no pixel decoded
    monkeypatch.undo()
    monkeypatch.setattr(vi, "MAX_DECODED_PIXELS", 100 * 100)
    for size, ok in (((100, 100), True), ((101, 100), False)):
        buf = io.BytesIO()
        Image.new("RGB", size).save(buf, format="PNG")
        if ok:
            assert vi.load_image(buf.getvalue()).shape == (100, 100, 3)  # at the limit: decoded
        else:
            with pytest.raises(DgemmaError, match=r"declares 101x100 pixels"):
                vi.load_image(buf.getvalue())


def test_image_errors(Image, tmp_path):
    bad_file = tmp_path / "bad.png"
    bad_file.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        ("https://example.com/a.png", r"'https://example.com/a.png' is a URL; .*download it first"),
        ("data:image/png;base64,AAAA", r"cannot decode image bytes <3 bytes"),
        ("data:text/plain;base64,AAAA", r"image data URL 'data:text/plain;base64,AAAA'... is not a base64 image"),
        ("x" * 4996 + ".png", r"image file 'x{110,}'... \(5000 characters\) does not exist"),
        (str(tmp_path / "missing.png"), r"image file '.*missing.png' does not exist"),
        (tmp_path, r"image path '.*' is not a file"),
        (b"not an image", r"cannot decode image bytes <12 bytes starting b'not an image'>"),
        (bad_file, r"cannot decode image file '.*bad.png'"),
        (np.zeros((2, 2, 2), np.uint8), r"cannot find the channel axis of image numpy.ndarray of shape \(2, 2, 2\)"),
        (np.zeros((2, 3, 4, 5), np.uint8), r"has 4 dimensions; expected \(H, W\), \(H, W, C\) or \(C, H, W\)"),
        (np.zeros((0, 5, 3), np.uint8), r"is empty \(0x5 pixels\)"),
        (np.full((4, 4, 3), 300, np.int32), r"has values in \[300, 300\]; integer images must be in \[0, 255\]"),
        (np.full((4, 4, 3), 1.5), r"float images must be finite and in \[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), r"float images must be finite and in \[0, 1\]"),
        (np.zeros((4, 4, 3), bool), r"dtype bool has an unsupported dtype"),
        (torch.zeros(4, 4, 3, dtype=torch.bool), r"torch.Tensor of shape \(4, 4, 3\) and dtype torch.bool has an "),
        (torch.zeros(4, 4, 3, dtype=torch.complex64), r"has an unsupported dtype"),
        (42, r"cannot use int 42 as an image; expected a file path"),
        (Image.new("RGB", (0, 3)), r"is empty \(3x0 pixels\)"),
    ]
    for value, message in cases:
        with pytest.raises(DgemmaError, match=message):
            vi.load_image(value)
    with pytest.raises(DgemmaError, match=r"image numpy.ndarray of shape \(5, 5, 2\) .* has 2 channels in layout HWC"):
        vi.load_image(np.zeros((5, 5, 2), np.uint8), layout="HWC")
    with pytest.raises(DgemmaError, match=r"layout='hwc' is not valid; expected None, 'HWC' or 'CHW'"):
        vi.load_image(np.zeros((5, 5, 3), np.uint8), layout="hwc")
    for budget in (100, 0, True, "280"):
        with pytest.raises(DgemmaError, match=rf"max_soft_tokens={budget!r} is not supported; expected one of "
                                              r"70, 140, 280, 560, 1120"):
            vi.preprocess_images(np.zeros((8, 8, 3), np.uint8), max_soft_tokens=budget)
    with pytest.raises(DgemmaError, match=r"patch_size=0 is not valid; expected an integer >= 1"):
        vi.preprocess_images(np.zeros((8, 8, 3), np.uint8), patch_size=0)
    with pytest.raises(DgemmaError, match=r"no images given; expected at least one"):
        vi.preprocess_images([])


def test_missing_pillow_and_pyav(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DgemmaError, match=r"image inputs need Pillow \(pip install pillow\)"):
        vi.load_image(tmp_path / "a.png")
    with pytest.raises(DgemmaError, match=r"video inputs need PyAV \(pip install av\)"):
        vi.load_video(tmp_path / "a.png")


def test_video_errors(av, video_files, tmp_path):
    mp4 = video_files[0]
    audio_only = tmp_path / "tone.wav"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cases = [
        (("http://example.com/v.mp4",), {}, r"video 'http://example.com/v.mp4' is a URL; .*download it first"),
        ((str(tmp_path / "missing.mp4"),), {}, r"video file '.*missing.mp4' does not exist"),
        ((tmp_path,), {}, r"video path '.*' is not a file"),
        ((b"garbage!",), {}, r"cannot decode video <8 bytes starting b'garbage!'>"),
        ((audio_only,), {}, r"video '.*tone.wav' has no video stream"),
        ((mp4,), {"fps": 0}, r"fps=0 is not valid; expected a positive number of frames per second"),
        ((mp4,), {"fps": float("nan")}, r"fps=nan is not valid"),
        ((mp4,), {"max_frames": 0}, r"max_frames=0 is not valid; expected an integer >= 1"),
        ((123,), {}, r"cannot use int 123 as a video; expected a file path or encoded video bytes"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(DgemmaError, match=message):
            vi.load_video(*args, **kwargs)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(DgemmaError, match=r"video frames .* dtype float32 are not valid; expected a uint8 numpy"):
        vi.Video(frames.astype(np.float32), (0.0, 1.0))
    with pytest.raises(DgemmaError, match=r"video frames .* are empty"):
        vi.Video(frames[:0], ())
    with pytest.raises(DgemmaError, match=r"video timestamps \(0.0,\) are not valid; expected 2 finite"):
        vi.Video(frames, (0.0,))
    with pytest.raises(DgemmaError, match=r"video timestamps \(0.0, -1.0\) are not valid"):
        vi.Video(frames, (0.0, -1.0))
    with pytest.raises(DgemmaError, match=r"video timestamps \('a', 'b'\) are not valid; expected seconds"):
        vi.Video(frames, ("a", "b"))
    with pytest.raises(DgemmaError, match=r"cannot use 'x' as videos; expected a Video \(see load_video\)"):
        vi.preprocess_video("x")
    with pytest.raises(DgemmaError, match=r"max_soft_tokens=True is not supported"):
        vi.preprocess_video(vi.Video(frames, (0.0, 1.0)), max_soft_tokens=True)


def test_an_image_past_the_towers_positions_is_named_in_a_chat():
    """render_chat names the image (and its budget) whose patch grid reaches past the vision tower's position table,
    rather than the image_position_ids tensor the caller never passed."""
    from types import SimpleNamespace

    from dgemma.prompts import _check_grid

    wide = vi.preprocess_images([np.zeros((48, 48, 3), np.uint8), np.zeros((10, 4000, 3), np.uint8)],
                                max_soft_tokens=560)
    reach = int(wide.image_position_ids[1].max())
    cfg = SimpleNamespace(vision=SimpleNamespace(position_embedding_size=reach))
    with pytest.raises(DgemmaError, match=rf"image 1 is too elongated for this model: at max_image_tokens=560 its "
                                          rf"patch grid reaches position {reach}, past the vision tower's {reach} "
                                          r"positions"):
        _check_grid(wide.image_position_ids, cfg, "image", "max_image_tokens=560")
    _check_grid(wide.image_position_ids, SimpleNamespace(vision=SimpleNamespace(position_embedding_size=reach + 1)),
                "image", "max_image_tokens=560")


def test_prompt_errors():
    frames = vi.Video(np.zeros((1, 48, 48, 3), np.uint8), (0.0,))
    videos = vi.preprocess_video(frames)
    with pytest.raises(DgemmaError, match=r"the prompt has 1 '<\|image\|>' placeholders but 2 images were given"):
        vi.expand_image_tokens("a <|image|>", [1, 2])
    with pytest.raises(DgemmaError, match=r"the prompt has 0 image token id 258880 placeholders but 1 images"):
        vi.expand_image_tokens([1, 2], [3])
    with pytest.raises(DgemmaError, match=r"token ids list \[1.5\] are not valid; expected a sequence of integers"):
        vi.expand_image_tokens([1.5], [3])
    with pytest.raises(DgemmaError, match=r"token ids .* are not valid; expected a 1-D integer tensor"):
        vi.expand_image_tokens(torch.zeros(2, 2, dtype=torch.long), [3])
    with pytest.raises(DgemmaError, match=r"num_soft_tokens_per_image\[0\]=0 is not valid"):
        vi.expand_image_tokens("<|image|>", [0])
    with pytest.raises(DgemmaError, match=r"cannot read num_soft_tokens_per_image from int 3"):
        vi.expand_image_tokens("<|image|>", 3)
    with pytest.raises(DgemmaError, match=r"the prompt has 2 '<\|video\|>' placeholders but 1 videos were given"):
        vi.expand_video_tokens("<|video|><|video|>", videos)
    with pytest.raises(DgemmaError, match=r"cannot expand video placeholders in list .*; expected the prompt text"):
        vi.expand_video_tokens([1, 2], videos)
    with pytest.raises(DgemmaError, match=r"expected the VideoInputs of preprocess_video"):
        vi.expand_video_tokens("<|video|>", [1])

    class NoVision:
        def token_id(self, token):
            return None

    with pytest.raises(DgemmaError, match=r"the tokenizer has no '<\|image\|>' token"):
        vi.VisionTokens.from_tokenizer(NoVision())
