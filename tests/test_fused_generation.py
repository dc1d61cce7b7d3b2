"""The generation loop's fused-vocabulary-head path, driven on the CPU by the head's fp32 reference
(the CUDA op has the same arguments and random stream)."""

import torch

from dgemma.ops.reference import ReferenceOps
from dgemma.random_checkpoint import random_engine
from dgemma.sampler import GenerationSettings, temperature
from dgemma.vocab_head import reference_vocab_head_step


class FusedReferenceOps(ReferenceOps):
    def fused_vocab_head(self, engine, settings):
        return True


def engine():
    eng = random_engine("tiny", seed=5, canvas_length=32)
    eng.model.ops = FusedReferenceOps()
    return eng


def test_first_draft_is_the_heads_output():
    eng = engine()
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    events = []
    eng.generate(ids, seed=3, max_new_tokens=32, max_denoising_steps=4, stream=events.append)
    g = torch.Generator().manual_seed(3)
    head_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    canvas = torch.randint(0, 512, (2, 32), generator=g)
    cache = eng.encode(ids)
    h = eng.model.denoise_hidden(canvas, cache, None, cache.prefix_view())  # the fused path's decoder pass
    settings = GenerationSettings(max_denoising_steps=4)
    out = reference_vocab_head_step(h, eng.model.w.embed, float(temperature(4, settings, "cpu")), head_seed, 0,
                                    canvas, None, settings.entropy_bound, soft_scale=eng.config.embed_scale)
    assert torch.equal(events[0].tokens, out.argmax)


def test_fused_path_is_seeded_and_stops_per_row():
    eng = engine()
    ids = torch.randint(3, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=64, max_denoising_steps=5, eos_token_id=[], pad_token_id=0)
    a, b = eng.generate(ids, seed=7, **kw), eng.generate(ids, seed=7, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, eng.generate(ids, seed=8, **kw).sequences)
    assert a.steps_per_block == [[5, 5, 5], [5, 5, 5]]
    quick = eng.generate(ids, seed=7, stability_threshold=0, confidence_threshold=1e9, **kw)
    assert quick.steps_per_block == [[1, 1, 1], [1, 1, 1]]  # confident at once: one step per block
    events = []
    res = eng.generate(ids, seed=7, stream=events.append, **kw)
    blocks = [e for e in events if e.kind == "block"]
    drafts = [e for e in events if e.kind == "draft"]
    assert torch.equal(blocks[0].tokens, drafts[4].tokens) and torch.equal(res.sequences[:, 12:44], blocks[0].tokens)
