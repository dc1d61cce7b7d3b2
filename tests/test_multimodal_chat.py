"""Images through the text front end: chat messages with image parts (generate, generate_stream,
ChatSession with cache reuse, the CLI), against transformers' generate on the same inputs."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from chat_fixture import IMAGE, VIDEO, write_multimodal_checkpoint
from conftest import load_hf

import dgemma
from dgemma.vision_inputs import (VisionTokens, expand_image_tokens, expand_video_tokens, load_video,
                                  preprocess_images, preprocess_video)

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_multimodal_checkpoint(tmp_path_factory.mktemp("mm"))


@pytest.fixture(scope="module")
def engines(ckpt):
    return load_hf(ckpt, torch.float32), dgemma.load(ckpt, dtype=torch.float32)


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_chat_with_images_matches_transformers(engines, tmp_path):
    hf, eng = engines
    first, second = picture(64, 40, 1), picture(30, 90, 2)
    path = tmp_path / "second.png"
    second.save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "What is"},
                                             {"type": "image", "image": str(path)},
                                             {"type": "text", "text": " in the sky?"}]}]
    kw = dict(max_new_tokens=16, max_denoising_steps=5, eos_token_id=[1], pad_token_id=0)
    ours = eng.generate(messages, max_image_tokens=70, generator=torch.Generator().manual_seed(4), **kw)
    # The same inputs built by hand: the template's text, placeholders expanded, the processor's pixels.
    text = eng.chat_template.render(messages)
    assert text.count("<|image|>") == 2
    images = preprocess_images([first, second], max_soft_tokens=70)
    tokens = VisionTokens.from_tokenizer(eng.tokenizer)
    ids = torch.tensor([eng.tokenizer.encode(expand_image_tokens(text, images, tokens=tokens))])
    assert torch.equal(ours.sequences[:, : ids.shape[1]], ids)
    types = (ids == IMAGE).long()
    torch.manual_seed(4)
    ref = hf.generate(ids, pixel_values=images.pixel_values, image_position_ids=images.image_position_ids,
                      mm_token_type_ids=types, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert ours.texts is not None and len(ours.responses) == 1
    streamed = list(eng.generate_stream(messages, max_image_tokens=70, generator=torch.Generator().manual_seed(4), **kw))
    assert torch.equal(streamed[-1].sequences, ours.sequences) and streamed[-1].texts == ours.texts


def test_session_reuses_the_cache_of_earlier_images(engines):
    _, eng = engines
    turn1 = {"role": "user", "content": [{"type": "image", "image": png_bytes(picture(50, 50, 3))},
                                         {"type": "text", "text": "Describe it."}]}
    kw = dict(max_new_tokens=8, max_denoising_steps=3)
    session = eng.chat()
    session.send(turn1, max_image_tokens=70, seed=1, **kw)
    follow = session.send("And the weather?", max_image_tokens=70, seed=2, **kw)
    # A fresh session given the same history encodes everything, the image included, and agrees.
    fresh = eng.chat()
    fresh.messages = list(session.messages[:-2])
    again = fresh.send("And the weather?", max_image_tokens=70, seed=2, **kw)
    assert torch.equal(follow.new_tokens, again.new_tokens)
    # The follow-up encoded neither the image's soft tokens nor its begin/end tokens again.
    counts = preprocess_images([picture(50, 50, 3)], max_soft_tokens=70).num_soft_tokens_per_image
    assert fresh.reencoded_tokens - session.reencoded_tokens >= counts[0] + 2


def test_image_errors_leave_the_engine_usable(engines, ckpt):
    _, eng = engines
    bad = [
        ([{"role": "user", "content": [{"type": "image", "image": "http://example.com/x.png"}]}], "download it first"),
        ([{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}], "cannot decode image bytes"),
        ([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}], "video file 'clip.mp4' does not exist"),
        ([{"role": "user", "content": [{"type": "video"}]}], "a video part without an 'video' value"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "has type 'audio'"),
        ([{"role": "user", "content": [{"type": "image"}]}], "without an 'image' value"),
    ]
    for messages, message in bad:
        with pytest.raises(dgemma.DgemmaError) as e:
            eng.generate(messages, max_new_tokens=8, max_denoising_steps=2)
        assert message in str(e.value), str(e.value)
    with pytest.raises(dgemma.DgemmaError, match="max_soft_tokens"):
        eng.generate([{"role": "user", "content": [{"type": "image", "image": picture(8, 8, 1)}]}],
                     max_image_tokens=100, max_new_tokens=8, max_denoising_steps=2)
    ok = eng.generate([{"role": "user", "content": "still fine"}], max_new_tokens=8, max_denoising_steps=2, seed=0)
    assert ok.new_tokens.shape == (1, 8)


def test_cli_generate_with_an_image(ckpt, tmp_path):
    path = tmp_path / "pic.png"
    picture(40, 40, 5).save(path)
    cmd = [sys.executable, "-m", "dgemma", "generate", "--model", ckpt, "--prompt", "What is this?", "--image",
           str(path), "--image-tokens", "70", "--max-new-tokens", "8", "--steps", "2", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    missing = subprocess.run(cmd[:-8] + ["--image", str(tmp_path / "nope.png")], capture_output=True, text=True)
    assert missing.returncode != 0 and "no such file" in missing.stderr and len(missing.stderr.splitlines()) == 1


def write_clip(path, seconds=3, fps=4, size=(48, 32)):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as f:
        stream = f.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(seconds * fps):
            frame = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            f.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        f.mux(stream.encode())
    return str(path)


def test_chat_with_a_video_equals_the_processors_inputs(engines, tmp_path):
    """A video part: decoded at 1 fps, each frame "mm:ss <|image> <|video|>*n <image|>" in the prompt and its
    patches through the vision tower; equal to the engine given the same inputs built by hand."""
    _, eng = engines
    clip = write_clip(tmp_path / "clip.mp4")
    messages = [{"role": "user", "content": [{"type": "video", "video": clip},
                                             {"type": "text", "text": "What happens?"}]}]
    kw = dict(max_new_tokens=16, max_denoising_steps=4, eos_token_id=[1], pad_token_id=0)
    ours = eng.generate(messages, generator=torch.Generator().manual_seed(5), **kw)
    text = eng.chat_template.render(messages)
    assert text.count("<|video|>") == 1
    videos = preprocess_video(load_video(clip))
    assert len(videos.timestamps[0]) == 3  # 3 seconds at 1 frame per second
    tokens = VisionTokens.from_tokenizer(eng.tokenizer)
    expanded = expand_video_tokens(text, videos, tokens=tokens)
    assert "00:00 <|image>" in expanded and "00:02 <|image>" in expanded
    ids = torch.tensor([eng.tokenizer.encode(expanded)])
    assert int((ids == VIDEO).sum()) == sum(videos.num_soft_tokens_per_video[0] for _ in range(3))
    ref = dgemma.Engine.generate(eng, ids, pixel_values_videos=videos.pixel_values_videos,
                                 video_position_ids=videos.video_position_ids,
                                 generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    # The frames matter: the same prompt without them scores differently.
    cache_a = dgemma.Engine.encode(eng, ids, pixel_values_videos=videos.pixel_values_videos,
                                   video_position_ids=videos.video_position_ids)
    cache_b = dgemma.Engine.encode(eng, ids)
    canvas = torch.zeros(1, eng.config.canvas_length, dtype=torch.long)
    assert not torch.allclose(eng.denoise(cache_a, canvas), eng.denoise(cache_b, canvas))


def test_session_with_a_video_reuses_its_frames(engines, tmp_path):
    _, eng = engines
    clip = write_clip(tmp_path / "clip.mp4", seconds=2)
    turn1 = {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "Describe it."}]}
    kw = dict(max_new_tokens=8, max_denoising_steps=3)
    session = eng.chat()
    session.send(turn1, seed=1, **kw)
    follow = session.send("And then?", seed=2, **kw)
    fresh = eng.chat()
    fresh.messages = list(session.messages[:-2])
    again = fresh.send("And then?", seed=2, **kw)
    assert torch.equal(follow.new_tokens, again.new_tokens)
    per_frame = preprocess_video(load_video(clip)).num_soft_tokens_per_video[0]
    assert fresh.reencoded_tokens - session.reencoded_tokens >= 2 * (per_frame + 2)


def test_cli_generate_and_chat_with_a_video(ckpt, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", seconds=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dgemma", "generate", "--model", ckpt, "--prompt", "What happens?", "--video", clip,
           "--max-new-tokens", "8", "--steps", "2", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    missing = subprocess.run(cmd[:8] + ["--video", str(tmp_path / "nope.mp4")], capture_output=True, text=True,
                             env=env)
    assert missing.returncode != 0 and "--video" in missing.stderr and "no such file" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    chat = subprocess.run([sys.executable, "-m", "dgemma", "chat", "--model", ckpt, "--max-new-tokens", "8", "--steps",
                           "2", "--seed", "0"], input=f"/video {clip}\nWhat happens?\nAnd then?\n", capture_output=True,
                          text=True, env=env)
    assert chat.returncode == 0, chat.stderr


def test_a_video_over_60_seconds_is_refused_and_the_engine_stays_usable(engines, tmp_path):
    _, eng = engines
    long_clip = write_clip(tmp_path / "long.mp4", seconds=62, fps=1, size=(16, 16))
    with pytest.raises(dgemma.DgemmaError, match=r"video '.*long.mp4' is 62 s long; the model takes videos of at most "
                                                 r"60 seconds"):
        eng.generate([{"role": "user", "content": [{"type": "video", "video": long_clip}]}], max_new_tokens=8)
    ok = eng.generate([{"role": "user", "content": "still fine"}], max_new_tokens=8, max_denoising_steps=2, seed=0)
    assert ok.new_tokens.shape == (1, 8)


def test_a_history_image_replaced_by_another_of_the_same_size_is_encoded_again(engines):
    """Two pictures of one size have the same placeholder ids: the session tells them apart by their pixels and
    re-encodes from the changed one (its cache then equals a fresh encoding of the conversation)."""
    _, eng = engines
    kw = dict(max_new_tokens=8, max_denoising_steps=2, max_image_tokens=70)

    def turn(seed):
        return {"role": "user", "content": [{"type": "image", "image": png_bytes(picture(48, 48, seed))},
                                            {"type": "text", "text": "Describe it."}]}

    session = eng.chat()
    session.send(turn(1), seed=1, **kw)
    session.send("More?", seed=2, **kw)
    kept = session.reencoded_tokens
    session.messages[0] = turn(2)  # another picture, same size
    session.send("And now?", seed=3, **kw)
    assert session.reencoded_tokens > kept + 40  # from the image on, not just the new turn
    from dgemma.prompts import render_chat

    rows, images = render_chat(eng, [session.messages[:-1]], max_image_tokens=70)
    fresh = eng.encode([rows[0]], **images)
    canvas = torch.randint(3, 300, (1, eng.config.canvas_length), generator=torch.Generator().manual_seed(0))
    ids_cached = session.cached_ids[:session.cache.length]
    assert ids_cached == rows[0][:len(ids_cached)]
    cache = session.cache
    rest = rows[0][cache.length:]
    if rest:
        cache = eng.encode([rest], cache=cache)
    torch.testing.assert_close(eng.denoise(cache, canvas), eng.denoise(fresh, canvas), atol=1e-4, rtol=1e-4)


def test_dgemma_chat_keeps_an_attached_image_after_its_file_is_gone(ckpt, tmp_path):
    """The chat command keeps an attachment's bytes: later turns do not read the file again."""
    path = tmp_path / "shot.png"
    picture(40, 40, 5).save(path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dgemma", "chat", "--model", ckpt, "--max-new-tokens", "8", "--steps", "2",
           "--seed", "0", "--image-tokens", "70"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    proc.stdin.write(f"/image {path}\nWhat is it?\n")
    proc.stdin.flush()
    proc.stdout.readline()  # the first answer
    os.remove(path)
    out, err = proc.communicate("And then?\n", timeout=300)
    assert proc.returncode == 0, err
    assert "does not exist" not in err
