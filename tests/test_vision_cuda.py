"""The vision path on the CUDA backend (bf16): soft tokens and the logits of a prompt with images against
the reference backend on the same checkpoint (GPU only)."""

import pytest
import torch

import dgemma
from test_vision import IMAGE, image_patches, prompt_with_images

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from hf_checkpoints import VISION, build_hf_model

    model = build_hf_model("odd", seed=4, text_overrides=dict(use_bidirectional_attention="vision"),
                           vision_overrides=dict(VISION, num_hidden_layers=2),
                           config_overrides=dict(image_token_id=IMAGE, boi_token_id=127, eoi_token_id=129))
    path = tmp_path_factory.mktemp("vision_cuda")
    model.to(torch.bfloat16).save_pretrained(path)
    cuda = dgemma.load(path, device="cuda", dtype=torch.bfloat16, backend="cuda")
    ref = dgemma.load(path, device="cuda", dtype=torch.bfloat16, backend="reference")
    return cuda, ref


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_soft_tokens_and_logits_match_the_reference_backend(engines):
    cuda, ref = engines
    pixels, positions, counts = image_patches([(6, 6), (3, 9)], seed=3)
    pixels, positions = pixels.cuda().to(torch.bfloat16), positions.cuda()
    a, b = cuda.model.image_features(pixels, positions), ref.model.image_features(pixels, positions)
    assert a.shape == b.shape == (sum(counts), cuda.config.hidden_size) and torch.isfinite(a).all()
    assert _rel(a, b) < 2e-2
    ids, _ = prompt_with_images(counts)
    ids = ids.cuda()
    canvas = torch.randint(0, 131, (1, 8), generator=torch.Generator().manual_seed(3)).cuda()
    la = cuda.denoise(cuda.encode(ids, pixel_values=pixels, image_position_ids=positions), canvas)
    lb = ref.denoise(ref.encode(ids, pixel_values=pixels, image_position_ids=positions), canvas)
    assert torch.isfinite(la).all() and _rel(la, lb) < 3e-2
