"""CUDA graphs of the denoising step (dgemma.steps) on the GPU: the fused head reading its step scalars from
device memory, the decoder over device-resident prefix lengths, and generate with and without graphs giving
the same tokens while launching the step as one graph replay with no host synchronisation inside it."""

import pytest
import torch

from dgemma.random_checkpoint import random_engine

pytestmark = pytest.mark.gpu


def _engine():
    return random_engine("small", dtype=torch.bfloat16, device="cuda", backend="cuda", quantization="fp8")


def test_vocab_head_reads_its_step_scalars_from_the_device_bit_exactly():
    from dgemma.ops.cuda_vocab_head import vocab_head_step

    gen = torch.Generator().manual_seed(0)
    b, c, v, hidden = 2, 37, 1000, 128
    h = torch.randn(b, c, hidden, generator=gen).to(torch.bfloat16).cuda()
    embed = (torch.randn(v, hidden, generator=gen) * (3.0 / hidden**0.5)).to(torch.bfloat16).cuda()
    canvas = torch.randint(0, v, (b, c), device="cuda")
    seed, step, t = 2**61 + 12345, 7, 0.6333333
    host = vocab_head_step(h, embed, t, seed, step, canvas, None, 0.5)
    t_dev = torch.tensor([t], dtype=torch.float32, device="cuda")
    scalars = torch.tensor([seed, step], dtype=torch.int64, device="cuda")
    dev = vocab_head_step(h, embed, t_dev, scalars, None, canvas, None, 0.5)
    for name in ("argmax", "sample", "next_canvas", "accepted", "entropy", "max_logit", "lse", "mean_entropy",
                 "soft"):
        assert torch.equal(getattr(host, name), getattr(dev, name)), name
    with pytest.raises(ValueError, match="device_seed_step has dtype int32, expected int64"):
        vocab_head_step(h, embed, t_dev, scalars.int(), None, canvas, None, 0.5)
    with pytest.raises(ValueError, match="step must be None"):
        vocab_head_step(h, embed, t_dev, scalars, 3, canvas, None, 0.5)


@pytest.mark.parametrize("prompt", [100, 1500])
def test_prefix_view_decoder_matches_the_host_length_decoder(prompt):
    eng = _engine()
    ids = torch.randint(3, eng.config.vocab_size, (2, prompt), device="cuda")
    cache = eng.encode(ids)
    canvas = torch.randint(0, eng.config.vocab_size, (2, 256), device="cuda")
    plain = eng.model.denoise_hidden(canvas, cache).float()
    viewed = eng.model.denoise_hidden(canvas, cache, None, cache.prefix_view()).float()
    assert float((viewed - plain).norm() / plain.norm()) < 1e-2


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_with_graphs_gives_the_tokens_without(batch):
    """Steps and commit passes replayed from graphs: the same tokens and drafts as the eager fused path."""
    eng = _engine()
    ids = torch.randint(3, eng.config.vocab_size, (batch, 100), device="cuda")
    kw = dict(max_new_tokens=512, max_denoising_steps=6, eos_token_id=[], pad_token_id=0,
              confidence_threshold=1e-30)
    capacity = 100 + 512 + 2 * (8 + 256)  # two chat turns of 8 + 256 tokens after the first generation
    eager_events, graph_events = [], []
    # rollback=256: the small preset's sliding rings (window 64) then hold a 256-token commit, which a commit pass
    # through encode_view (and so its graph) needs; without it the commit runs eagerly through encode.
    eager_cache = eng.new_cache(batch, capacity, rollback=256)
    eager = eng.generate(ids, seed=5, cache=eager_cache, stream=eager_events.append, **kw)
    eng.cuda_graphs = True
    cache = eng.new_cache(batch, capacity, rollback=256)
    graphed = eng.generate(ids, seed=5, cache=cache, stream=graph_events.append, **kw)
    stepper = cache._graph_stepper
    assert stepper.failed is None, stepper.failed
    # Two blocks of 6 steps at prefixes 100 and 356 (one bucket): the first step, a later step and the commit
    # pass before block 2 captured once each; the other steps replayed.
    assert stepper.captures == 3 and stepper.replays == 2 * 6 - 2
    assert torch.equal(graphed.sequences, eager.sequences)
    assert len(graph_events) == len(eager_events)
    for a, b in zip(graph_events, eager_events):
        assert torch.equal(a.tokens, b.tokens), (a.kind, a.block, a.step)
    # The same cache again (a chat turn, still in the bucket): replays only, still identical to eager.
    turn = dict(max_new_tokens=256, max_denoising_steps=6, eos_token_id=[], confidence_threshold=1e-30)
    again = eng.generate(graphed.new_tokens[:, :8], seed=6, cache=cache, **turn)
    assert stepper.captures == 3 and stepper.replays == 2 * 6 - 2 + 6
    # A turn with another entropy bound (a launch argument of the head, baked into a captured graph), still in the
    # bucket: new graphs of its first and later steps, not the old ones replayed with the old bound.
    other = dict(turn, entropy_bound=0.7)
    third = eng.generate(again.new_tokens[:, :8], seed=7, cache=cache, **other)
    assert stepper.captures == 5
    eng.cuda_graphs = False
    ref = eng.generate(eager.new_tokens[:, :8], seed=6, cache=eager_cache, **turn)
    assert torch.equal(again.sequences, ref.sequences)
    ref_third = eng.generate(ref.new_tokens[:, :8], seed=7, cache=eager_cache, **other)
    assert torch.equal(third.sequences, ref_third.sequences)


def test_a_replayed_step_does_not_synchronise_with_the_host():
    """Inside a replay nothing waits for the GPU: torch's sync debug mode raises on any synchronising call."""
    eng = _engine()
    eng.cuda_graphs = True
    ids = torch.randint(3, eng.config.vocab_size, (1, 200), device="cuda")
    cache = eng.new_cache(1, 200 + 512)
    eng.generate(ids, seed=1, cache=cache, max_new_tokens=256, max_denoising_steps=4, eos_token_id=[])
    stepper = cache._graph_stepper
    replays = stepper.replays
    canvas = torch.randint(0, eng.config.vocab_size, (1, 256), device="cuda")
    soft = torch.zeros(1, 256, eng.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    done = torch.zeros(1, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stepper(canvas, soft, 3, done)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stepper.replays == replays + 1


def test_the_fast_stream_accessor_names_torchs_current_stream():
    """Kernels are launched on _ext.current_stream(device): the same handle as torch's current stream, a
    side stream and a graph's capture stream included."""
    from dgemma import _ext

    dev = torch.device("cuda")
    assert _ext.current_stream(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _ext.current_stream(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream
    g = torch.cuda.CUDAGraph()
    seen = []
    with torch.cuda.graph(g):
        seen.append((_ext.current_stream(dev), torch.cuda.current_stream(dev).cuda_stream))
    assert seen[0][0] == seen[0][1]


def test_a_failed_capture_leaves_the_stream_and_the_random_generator_as_they_were():
    """A capture that fails (here a host read inside it) leaves torch's current stream and its default CUDA generator
    as they were: torch.cuda.graph alone left its capture stream current and the generator in capture mode (every
    later CUDA random draw raised "Offset increment outside graph capture encountered unexpectedly"). A capture
    after it works."""
    from dgemma.steps import CudaGraphFactory

    dev = torch.device("cuda")
    factory = CudaGraphFactory()
    stream = torch.cuda.current_stream(dev)
    x = torch.arange(4.0, device=dev)

    def reads_the_host():
        y = x * 2
        y.sum().item()  # a synchronising read: not permitted while capturing
        return y

    with pytest.raises(Exception):
        factory.capture(reads_the_host, dev)
    factory.recover(dev)
    assert torch.cuda.current_stream(dev) == stream
    assert not torch.cuda.is_current_stream_capturing()
    torch.randint(0, 10, (4,), device=dev)
    torch.rand(3, device=dev)
    graph, out = factory.capture(lambda: x * 3, dev)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 3)


def test_a_capture_survives_old_graphs_becoming_garbage():
    """Old graphs freed by the cyclic collector while a capture runs would be destroyed on the capturing thread,
    which invalidates the capture (an H200 run failed a random capture so). The collector is paused during a
    capture: with it set to run at every allocation, three graphs in cycles become garbage and a capture succeeds."""
    import gc

    from dgemma.steps import CudaGraphFactory

    dev = torch.device("cuda")
    factory = CudaGraphFactory()
    x = torch.arange(4.0, device=dev)

    class Holder:
        pass

    holders = []
    for _ in range(3):
        h = Holder()
        h.me = h
        h.graph, _ = factory.capture(lambda: x + 1, dev)
        holders.append(h)
    gone = []

    def body():
        # Inside the capture: the collector is off, and the old graphs become cyclic garbage only now (any collection
        # before the capture found them alive), then allocations that would trigger a collection at threshold 1.
        gone.append(gc.isenabled())
        holders.clear()
        return [x + i for i in range(50)][-1]

    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        graph, out = factory.capture(body, dev)
    finally:
        gc.set_threshold(*old)
    assert gone == [False] and gc.isenabled()
    gc.collect()  # the old graphs are freed here, outside any capture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x + 49)


def test_encode_view_matches_encode_on_the_gpu():
    """The commit pass with device-resident start positions (what a graph replays) against the host-position
    encoder: the same K/V up to the split plan's rounding, the same validity and length."""
    eng = _engine()
    ids = torch.randint(3, eng.config.vocab_size, (2, 700), device="cuda")
    # rollback=256: each sliding ring (window 64) holds the 256-token block, as encode_view requires.
    a, b = eng.new_cache(2, 700 + 512, rollback=256), eng.new_cache(2, 700 + 512, rollback=256)
    for cache in (a, b):
        eng.encode(ids, cache=cache)
    for n in range(2):
        block = torch.randint(0, eng.config.vocab_size, (2, 256), device="cuda")
        eng.model.encode(block, a)
        start = b.length
        eng.model.encode_view(block, b, b.prefix_view())
        b.length = start + 256
    assert a.length == b.length and torch.equal(a.valid, b.valid)
    for layer in range(len(a.keys)):
        for x, y in ((a.keys[layer], b.keys[layer]), (a.values[layer], b.values[layer])):
            assert float((x.float() - y.float()).norm() / x.float().norm()) < 1e-2, layer


@pytest.mark.parametrize("confidence", [1e-30, 5.0])
def test_stopping_on_the_device_gives_the_tokens_of_the_host_loop(monkeypatch, confidence):
    """DGEMMA_STOP_ON_DEVICE=1: each block's steps queued at once as conditional graph replays, one read per block,
    no host synchronisation while they are queued; the tokens, steps per row and draft events of the eager loop."""
    from dgemma.steps import CudaGraphFactory, CudaGraphStepper

    why = CudaGraphFactory().conditional_unsupported()
    if why is not None:  # e.g. torch 2.11: DGEMMA_STOP_ON_DEVICE=1 warns and stops on the host (tests/test_steps.py)
        pytest.skip(why)
    eng = _engine()
    ids = torch.randint(3, eng.config.vocab_size, (2, 100), device="cuda")
    kw = dict(max_new_tokens=512, max_denoising_steps=6, eos_token_id=[], pad_token_id=0,
              confidence_threshold=confidence, stability_threshold=1)
    eager_events, events = [], []
    eager = eng.generate(ids, seed=5, cache=eng.new_cache(2, 612 + 256, rollback=256), stream=eager_events.append,
                         **kw)
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "1")
    eng.cuda_graphs = True
    cache = eng.new_cache(2, 612 + 256, rollback=256)
    checked = []
    original = CudaGraphStepper.gated_step

    def gated_step(self, run, n, first):
        # Once both steps' graphs exist (the first's eager run and capture read the flags once), queueing a step
        # waits for nothing.
        captured = sum(key[0] == "gated" for key in self.graphs) == 2
        if captured:
            torch.cuda.set_sync_debug_mode("error")
        try:
            original(self, run, n, first)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(captured)
    monkeypatch.setattr(CudaGraphStepper, "gated_step", gated_step)
    res = eng.generate(ids, seed=5, cache=cache, stream=events.append, **kw)
    stepper = cache._graph_stepper
    assert stepper.stops_on_device and stepper.failed is None, stepper.failed
    if confidence == 1e-30:  # no row stops: block 1 captures both steps, block 2 queues its 6 steps unchecked
        assert checked.count(True) == 6
    assert torch.equal(res.sequences, eager.sequences) and res.steps_per_block == eager.steps_per_block
    assert [(e.kind, e.block, e.step) for e in events] == [(e.kind, e.block, e.step) for e in eager_events]
    for a, b in zip(events, eager_events):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.finished, b.finished)
