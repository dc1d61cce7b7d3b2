"""The denoising step as generate runs it (dgemma.steps): the decoder over a prefix read from the device,
per-row prefix lengths, the step's independence from host values within a prefix bucket (what a CUDA graph
needs), and the graph stepper's bookkeeping, driven on the CPU by a stand-in graph that re-runs the step and
checks that it launches exactly what it captured."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dgemma.cache import MIN_PREFIX_BUCKET, PrefixView, prefix_bucket
from dgemma.errors import DgemmaError, NonFiniteError
from dgemma.ops.reference import ReferenceOps
from dgemma.random_checkpoint import random_engine
from dgemma.sampler import GenerationSettings, PhiloxHeadSampler
from dgemma.steps import CudaGraphFactory, CudaGraphStepper, FusedHeadStepper, make_stepper, stops_on_device


class CapturableOps(ReferenceOps):
    """The reference ops with the experts computed without reading the routing on the host (every token's
    k experts gathered), as the CUDA MoE kernel does: the reference MoE groups tokens by expert with
    host-side counts, which no graph could replay."""

    def moe(self, x, ids, weights, gate_up, down):
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            gate, up = torch.bmm(gate_up[ids[:, slot]], x[:, :, None])[..., 0].chunk(2, dim=-1)
            y = torch.bmm(down[ids[:, slot]], (torch.nn.functional.gelu(gate, approximate="tanh") * up)[:, :, None])
            out = out + y[..., 0] * weights[:, slot, None].to(x.dtype)
        return out


class FusedReferenceOps(CapturableOps):
    def fused_vocab_head(self, engine, settings):
        return True


def engine(fused=False, seed=5, capturable=False, canvas=32):
    eng = random_engine("tiny", seed=seed, canvas_length=canvas)
    if fused:
        eng.model.ops = FusedReferenceOps()
    elif capturable:
        eng.model.ops = CapturableOps()
    return eng


def ids(b, t, seed=0):
    return torch.randint(3, 512, (b, t), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- buckets ------------------------------------------------------------------------------------------


def test_prefix_buckets_cover_each_length_and_overshoot_at_most_a_quarter():
    capacity = 200_000
    prev = 0
    for length in list(range(0, 5000)) + list(range(5000, 140_000, 997)):
        bound = prefix_bucket(length, capacity)
        assert bound >= length and bound >= prev  # covers, monotone
        if length > 4 * MIN_PREFIX_BUCKET:
            assert bound <= 1.25 * length, (length, bound)
        prev = bound
    assert prefix_bucket(0, capacity) == prefix_bucket(1024, capacity) == 1024
    assert prefix_bucket(1025, capacity) == 2048 and prefix_bucket(4097, capacity) == 5120
    assert prefix_bucket(9000, capacity) == 10240
    assert prefix_bucket(5000, 4500) == 4500  # never past the cache
    # Few buckets: every length up to 128K falls into one of ~50.
    assert len({prefix_bucket(n, capacity) for n in range(0, 131_072, 64)}) < 50


# -- the decoder over a PrefixView --------------------------------------------------------------------


@pytest.mark.parametrize("prompt,rollback,pad", [(20, 0, 0), (70, 0, 0), (70, 9, 0), (70, 0, 5)])
def test_prefix_view_decoder_equals_the_host_length_decoder(prompt, rollback, pad):
    """Sliding rings that wrap (prompt 70 > window 32), spare ring slots, left padding; fp32."""
    eng = engine()
    x = ids(2, prompt)
    mask = None
    if pad:
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[1, :pad] = False
    cache = eng.new_cache(2, prompt + 32, rollback=rollback)
    eng.encode(x, cache=cache, attention_mask=mask)
    canvas = ids(2, 32, seed=1)
    soft = torch.randn(2, 32, eng.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for s in (None, soft):
        plain = eng.model.denoise_hidden(canvas, cache, s)
        view = cache.prefix_view()
        assert view.bound == prefix_bucket(prompt, cache.capacity) and view.lengths.tolist() == [prompt, prompt]
        viewed = eng.model.denoise_hidden(canvas, cache, s, view)
        assert rel(viewed, plain) < 1e-5


def test_rows_of_one_cache_can_have_different_prefix_lengths():
    """Row 1 reads only its first 61 of 70 cached tokens: the same hidden states as a cache that holds just
    those 61 (the ring keeps the positions a shorter row still sees thanks to its spare slots)."""
    eng = engine()
    x = ids(2, 70)
    cache = eng.new_cache(2, 102, rollback=9)
    eng.encode(x, cache=cache)
    canvas = ids(2, 32, seed=1)
    view = PrefixView(torch.tensor([70, 61], dtype=torch.int32), prefix_bucket(70, cache.capacity))
    both = eng.model.denoise_hidden(canvas, cache, None, view)
    for row, length in ((0, 70), (1, 61)):
        alone = eng.new_cache(1, 102)
        eng.encode(x[row:row + 1, :length], cache=alone)
        ref = eng.model.denoise_hidden(canvas[row:row + 1], alone, None)
        assert rel(both[row:row + 1], ref) < 1e-5, row


# -- nothing in a step depends on a host value that changes within a bucket ----------------------------


class OpTrace(TorchDispatchMode):
    """Every aten op run, with its non-tensor arguments: what a CUDA graph would bake into its launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def scalars(x):
            if isinstance(x, torch.Tensor):
                return ("tensor", x.dtype, tuple(x.shape))
            if isinstance(x, (list, tuple)):
                return tuple(scalars(y) for y in x)
            return x

        self.ops.append((str(func), scalars(args), tuple(sorted((k, scalars(v)) for k, v in kwargs.items()))))
        return func(*args, **kwargs)


def trace(fn):
    with OpTrace() as t:
        out = fn()
    return t.ops, out


def test_the_decoder_pass_of_one_bucket_launches_the_same_ops_whatever_the_length():
    """Two prefix lengths of one bucket, with and without self-conditioning: the same ops with the same
    non-tensor arguments, and no host read (a graph captured at one length replays correctly at the other)."""
    eng = engine(capturable=True)
    canvas = ids(1, 32, seed=1)
    traces = {}
    for prompt in (40, 75):
        cache = eng.new_cache(1, 200, rollback=32)
        eng.encode(ids(1, prompt), cache=cache)
        view = cache.prefix_view()
        soft = torch.randn(1, 32, eng.config.hidden_size)
        for first in (True, False):
            ops, _ = trace(lambda: eng.model.denoise_hidden(canvas, cache, None if first else soft, view))
            traces[prompt, first] = ops
    for first in (True, False):
        assert traces[40, first] == traces[75, first]
        assert not any(name in op[0] for op in traces[40, first] for name in ("_local_scalar_dense", "nonzero", "bincount"))
    # Without the view the positions and the slices follow the host length: a graph could not be reused.
    cache_a, cache_b = eng.new_cache(1, 200), eng.new_cache(1, 200)
    eng.encode(ids(1, 40), cache=cache_a)
    eng.encode(ids(1, 75), cache=cache_b)
    assert trace(lambda: eng.model.denoise_hidden(canvas, cache_a))[0] != \
        trace(lambda: eng.model.denoise_hidden(canvas, cache_b))[0]


# -- the graph stepper, with a stand-in for CUDA graphs --------------------------------------------------


class ReplayCheckingGraph:
    """Stands in for a CUDA graph on the CPU: replay() re-runs the captured step, requires it to run exactly
    the ops and non-tensor arguments it ran at capture (what a real graph would launch), and writes the
    results into the outputs returned at capture (a graph's outputs keep their addresses)."""

    def __init__(self, fn, ops, out):
        self.fn, self.ops, self.out = fn, ops, out
        self.replays = 0

    def replay(self):
        ops, new = trace(self.fn)
        assert ops == self.ops, "the step launched something other than what was captured"
        if self.out is not None:
            for name in ("argmax", "next_canvas", "mean_entropy", "soft"):
                getattr(self.out, name).copy_(getattr(new, name))
        self.replays += 1


class ReplayCheckingFactory:
    """Captures by tracing one run of the callable; as a real capture runs nothing, the cache the run may
    write (a commit pass) is put back as it was afterwards."""

    def __init__(self):
        self.graphs, self.cache = [], None

    def capture(self, fn, device):
        c = self.cache
        saved = None if c is None else ([k.clone() for k in c.keys], [v.clone() for v in c.values], c.valid.clone())
        ops, out = trace(fn)
        if saved is not None:
            for dst, src in zip(c.keys + c.values + [c.valid], saved[0] + saved[1] + [saved[2]]):
                dst.copy_(src)
        g = ReplayCheckingGraph(fn, ops, out)
        self.graphs.append(g)
        return g, out

    def recover(self, device):
        pass

    def conditional_unsupported(self):
        return None

    def capture_conditional(self, fn, pred, device, writes):
        """A conditional body: traced by one run whose writes are put back (a capture runs nothing); a replay runs
        it only where ``pred`` holds then."""
        saved = [w.clone() for w in writes]
        ops, out = trace(fn)
        for w, v in zip(writes, saved):
            w.copy_(v)
        g = ConditionalReplayGraph(fn, ops, pred)
        self.graphs.append(g)
        return g, out


class ConditionalReplayGraph(ReplayCheckingGraph):
    def __init__(self, fn, ops, pred):
        super().__init__(fn, ops, None)
        self.pred, self.skipped = pred, 0

    def replay(self):
        if bool(self.pred):
            super().replay()
        else:
            self.skipped += 1


def graphed(eng, factory):
    """generate() on ``eng`` with CUDA-graph steppers made with ``factory`` (the eligibility check, which
    needs a GPU and FP8 experts, is what this skips)."""
    eng.cuda_graphs = True
    original = make_stepper

    def stepper(engine, cache, sampler):
        if not isinstance(sampler, PhiloxHeadSampler):
            return original(engine, cache, sampler)
        s = getattr(cache, "_graph_stepper", None)
        if s is None:
            s = cache._graph_stepper = CudaGraphStepper(engine.model, cache, sampler, graph_factory=factory)
            factory.cache = cache
        s.bind(sampler)
        s.stops_on_device = s.conditional_failed is None and stops_on_device(factory)
        return s
    return stepper


def test_graph_stepper_gives_the_eager_tokens_and_replays_one_graph_per_bucket(monkeypatch):
    import dgemma.generation as generation

    eng = engine(fused=True, canvas=16)  # canvas 16 fits the sliding rings (31 slots): commits go through a graph
    x = ids(2, 20)
    kw = dict(max_new_tokens=96, max_denoising_steps=5, eos_token_id=[], pad_token_id=0, stability_threshold=1,
              confidence_threshold=1e-30)
    eager_events = []
    eager = eng.generate(x, seed=11, stream=eager_events.append, **kw)
    factory = ReplayCheckingFactory()
    monkeypatch.setattr(generation, "make_stepper", graphed(eng, factory))
    cache = eng.new_cache(2, 20 + 96)
    events = []
    res = eng.generate(x, seed=11, cache=cache, stream=events.append, **kw)
    assert torch.equal(res.sequences, eager.sequences)
    assert [(e.kind, e.step) for e in events] == [(e.kind, e.step) for e in eager_events]
    for a, b in zip(events, eager_events):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.finished, b.finished)
    stepper = cache._graph_stepper
    # Six blocks of 5 steps in one bucket: the first step, the later steps and the commit pass (before blocks
    # 2..6) captured once each and replayed after.
    assert stepper.captures == 3 and stepper.failed is None
    assert stepper.replays == (6 * 5 - 2) + (5 - 1) == sum(g.replays for g in factory.graphs)


def test_graph_stepper_reuses_its_graphs_for_the_next_generation_on_the_same_cache(monkeypatch):
    eng = engine(fused=True)
    kw = dict(max_new_tokens=32, max_denoising_steps=4, eos_token_id=[], pad_token_id=0, confidence_threshold=1e-30)
    cache, factory = _two_generations_eager_and_graphed(monkeypatch, eng, kw, kw, 30 + 64)
    # The first generation (one block) captures the two steps; the second's new prompt goes through the plain
    # encoder and its one block replays them: no new capture in the same bucket.
    assert cache._graph_stepper.captures == 2 and len(factory.graphs) == 2


def _two_generations_eager_and_graphed(monkeypatch, eng, first_kw, second_kw, capacity):
    """Two generations on one cache (the second's prompt is the first's answer), eagerly, then with stand-in
    graphs on another cache: the same tokens. The graphed cache and the factory."""
    import dgemma.generation as generation

    x = ids(1, 30)
    cache_eager = eng.new_cache(1, capacity)
    first_eager = eng.generate(x, seed=1, cache=cache_eager, **first_kw)
    second_eager = eng.generate(first_eager.new_tokens, seed=2, cache=cache_eager, **second_kw)
    factory = ReplayCheckingFactory()
    monkeypatch.setattr(generation, "make_stepper", graphed(eng, factory))
    cache = eng.new_cache(1, capacity)
    first = eng.generate(x, seed=1, cache=cache, **first_kw)
    # A replay of a graph captured with other launch arguments would launch those: the stand-in refuses that.
    second = eng.generate(first.new_tokens, seed=2, cache=cache, **second_kw)
    assert torch.equal(first.sequences, first_eager.sequences)
    assert torch.equal(second.sequences, second_eager.sequences)
    return cache, factory


class LaunchArgumentOps(FusedReferenceOps):
    """The fused head's host settings made visible to the stand-in graph as the CUDA head has them: arguments
    of a launch (here of an aten fill, which the trace records with its value), which a captured graph keeps."""

    def vocab_head_step(self, h, embed, temperature, seed, step, canvas, prev_argmax, entropy_bound, *,
                        confidence_threshold=0.005, **kw):
        torch.full((1,), entropy_bound)
        torch.full((1,), confidence_threshold)
        return super().vocab_head_step(h, embed, temperature, seed, step, canvas, prev_argmax, entropy_bound,
                                       confidence_threshold=confidence_threshold, **kw)


@pytest.mark.parametrize("change", [dict(entropy_bound=2.0), dict(confidence_threshold=1.0)])
def test_a_generation_with_other_sampler_settings_does_not_replay_graphs_captured_with_the_old(monkeypatch, change):
    eng = engine(fused=True)
    eng.model.ops = LaunchArgumentOps()
    kw = dict(max_new_tokens=32, max_denoising_steps=4, eos_token_id=[], pad_token_id=0, stability_threshold=0)
    first_kw = dict(kw, confidence_threshold=1e-30)
    cache, factory = _two_generations_eager_and_graphed(monkeypatch, eng, first_kw, dict(first_kw, **change), 200)
    stepper = cache._graph_stepper
    assert stepper.captures == 4 and len(factory.graphs) == 4  # first and later steps, for each settings
    # The second generation's settings again: its graphs are replayed, none captured.
    eng.generate(ids(1, 8), seed=3, cache=cache, **dict(first_kw, **change))
    assert stepper.captures == 4 and stepper.failed is None


def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(caplog):
    eng = engine(fused=True)

    class Failing:
        recovered = 0

        def capture(self, fn, device):
            raise RuntimeError("operation not permitted when stream is capturing")

        def recover(self, device):
            Failing.recovered += 1

    cache = eng.new_cache(1, 64)
    eng.encode(ids(1, 20), cache=cache)
    settings = GenerationSettings(max_denoising_steps=3)
    sampler = PhiloxHeadSampler(eng.model, settings, torch.Generator().manual_seed(0), eng.device)
    stepper = CudaGraphStepper(eng.model, cache, sampler, graph_factory=Failing())
    eager = FusedHeadStepper(eng.model, cache,
                             PhiloxHeadSampler(eng.model, settings, torch.Generator().manual_seed(0), eng.device))
    canvas = ids(1, 32, seed=3)
    done = torch.zeros(1, dtype=torch.bool)
    with caplog.at_level("WARNING", logger="dgemma"):
        a = stepper(canvas, None, 3, done)
        b = stepper(a.next_canvas, a.soft, 2, done)
    assert "CUDA graph capture failed" in caplog.text and stepper.failed and Failing.recovered == 1
    ea = eager(canvas, None, 3, done)
    eb = eager(ea.next_canvas, ea.soft, 2, done)
    assert torch.equal(a.argmax, ea.argmax) and torch.equal(b.argmax, eb.argmax)
    assert torch.equal(b.next_canvas, eb.next_canvas)


def test_the_collector_is_paused_while_any_thread_captures_and_restored_after():
    """A collection inside a capture can free an old CUDA graph on the capturing thread, which invalidates the
    capture (seen on an H200: a random capture failed once an earlier test's cache became garbage). The pause nests
    across threads: the collector comes back when the last capture ends, and only if it was on before."""
    import gc
    import threading

    from dgemma.steps import _collector_paused

    was = gc.isenabled()
    try:
        gc.enable()
        inside, release = threading.Event(), threading.Event()

        def other_capture():
            with _collector_paused():
                inside.set()
                release.wait(10)

        t = threading.Thread(target=other_capture)
        with _collector_paused():
            assert not gc.isenabled()
            t.start()
            assert inside.wait(10)
        assert not gc.isenabled()  # the other thread still captures
        release.set()
        t.join(10)
        assert gc.isenabled()
        with pytest.raises(RuntimeError, match="boom"):
            with _collector_paused():
                raise RuntimeError("boom")
        assert gc.isenabled()
        gc.disable()
        with _collector_paused():
            pass
        assert not gc.isenabled()  # a collector the application turned off stays off
    finally:
        (gc.enable if was else gc.disable)()


def test_a_dropped_cache_frees_its_graph_stepper_without_the_collector():
    """The stepper lives on its cache and refers to it weakly: dropping the cache frees the stepper and its graphs at
    once (no cycle left for the collector, which may run at any time, also inside a later capture)."""
    import gc
    import weakref

    eng = engine(fused=True)
    cache = eng.new_cache(1, 64)
    sampler = PhiloxHeadSampler(eng.model, GenerationSettings(), torch.Generator().manual_seed(0), eng.device)
    stepper = cache._graph_stepper = CudaGraphStepper(eng.model, cache, sampler, graph_factory=ReplayCheckingFactory())
    assert stepper.cache is cache
    gone = weakref.ref(stepper)
    was = gc.isenabled()
    gc.disable()
    try:
        del stepper, cache
        assert gone() is None
    finally:
        if was:
            gc.enable()


def test_cuda_graphs_are_refused_with_the_reason_where_a_step_cannot_be_captured(caplog):
    eng = engine(fused=True)
    eng.cuda_graphs = True
    with caplog.at_level("WARNING", logger="dgemma"):
        res = eng.generate(ids(1, 10), seed=0, max_new_tokens=32, max_denoising_steps=2)
    assert res.sequences.shape == (1, 42)
    assert "CUDA graphs are off for this engine: not on a CUDA device" in caplog.text
    assert eng.cuda_graphs is False


def test_load_takes_cuda_graphs(tmp_path, caplog):
    import dgemma
    from dgemma.errors import DgemmaError
    from dgemma.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", "tiny", canvas_length=32)
    assert dgemma.load(path).cuda_graphs is False
    with caplog.at_level("WARNING", logger="dgemma"):  # on a CPU the step cannot be captured: off, and why
        assert dgemma.load(path, cuda_graphs=True).cuda_graphs is False
    assert "CUDA graphs are off for this engine: not on a CUDA device" in caplog.text
    with pytest.raises(DgemmaError, match="cuda_graphs must be True or False, got 'yes'"):
        dgemma.load(path, cuda_graphs="yes")


# -- the commit pass with its start on the device (encode_view) -------------------------------------------


def snapshot(cache):
    return [k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.valid.clone(), cache.length


@pytest.mark.parametrize("prompt,rollback,pad", [(20, 0, 0), (70, 16, 0), (45, 0, 3)])
def test_encode_view_writes_what_encode_writes(prompt, rollback, pad):
    """Three commits of 16 tokens after a prompt (rings wrapping, spare slots, left padding): the cache holds
    the same K/V (fp32, within 1e-5), validity and length as with the host-position encoder."""
    eng = engine(canvas=16)
    x = ids(2, prompt)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :pad] = False
    a, b = (eng.new_cache(2, prompt + 64, rollback=rollback) for _ in range(2))
    for c in (a, b):
        eng.encode(x, cache=c, attention_mask=mask if pad else None)
    for n in range(3):
        block = ids(2, 16, seed=10 + n)
        eng.model.encode(block, a)
        start = b.length
        eng.model.encode_view(block, b, b.prefix_view())
        b.length = start + 16
    ka, va, valid_a, len_a = snapshot(a)
    kb, vb, valid_b, len_b = snapshot(b)
    assert len_a == len_b and torch.equal(valid_a, valid_b)
    for x1, x2 in zip(ka + va, kb + vb):
        assert rel(x2, x1) < 1e-5


def test_encode_view_refuses_a_block_longer_than_a_sliding_ring():
    """Two positions of one block would share a ring slot (which lands is unspecified on a GPU): a clear error,
    the cache untouched."""
    from dgemma.errors import DgemmaError

    eng = engine(canvas=16)
    sliding = [i for i, spec in enumerate(eng.config.layers) if spec.is_sliding]
    cache = eng.new_cache(1, 400)
    eng.encode(ids(1, 10), cache=cache)
    ring = min(cache.ring_size(i) for i in sliding)
    before = snapshot(cache)
    with pytest.raises(DgemmaError, match=rf"encode_view of {ring + 1} tokens .* has {ring} slots .*rollback >= 1"):
        eng.model.encode_view(ids(1, ring + 1, seed=3), cache, cache.prefix_view())
    after = snapshot(cache)
    assert after[3] == before[3] and torch.equal(after[2], before[2])
    assert all(torch.equal(x, y) for x, y in zip(after[0] + after[1], before[0] + before[1]))


def test_the_commit_pass_of_one_bucket_launches_the_same_ops_whatever_the_length():
    eng = engine(capturable=True, canvas=16)
    block = ids(1, 16, seed=4)
    traces = []
    for prompt in (40, 75):
        cache = eng.new_cache(1, 200, rollback=16)
        eng.encode(ids(1, prompt), cache=cache)
        view = cache.prefix_view()  # filled on the host, outside what a graph holds
        traces.append(trace(lambda: eng.model.encode_view(block, cache, view))[0])
    assert traces[0] == traces[1]
    assert not any(name in op[0] for op in traces[0] for name in ("_local_scalar_dense", "nonzero", "bincount"))


def test_an_interrupted_fused_generation_leaves_the_cache_as_it_was():
    """The fused path's commit passes write through encode_view: closing the stream after the second block
    (one commit done) rolls the cache back exactly, and a retry equals an uninterrupted run."""
    eng = engine(fused=True, canvas=16)
    x = ids(1, 30)
    kw = dict(max_new_tokens=64, max_denoising_steps=3, eos_token_id=[], seed=4)
    cache = eng.new_cache(1, 30 + 64 + 32)
    eng.encode(x, cache=cache)
    before = snapshot(cache)
    stream = eng.generate_stream(x[:, :0].new_tensor([[5, 6, 7]]), cache=cache, **kw)
    blocks = 0
    for item in stream:
        if item.kind == "block":
            blocks += 1
            if blocks == 2:
                break
    stream.close()
    after = snapshot(cache)
    assert after[3] == before[3] and torch.equal(after[2], before[2])
    for layer, spec in enumerate(eng.config.layers):
        # What the cache promises: a sliding layer's whole ring, a full layer's positions below its length.
        n = cache.ring_size(layer) if spec.is_sliding else before[3]
        for which in (0, 1):
            assert torch.equal(after[which][layer][:, :, :n], before[which][layer][:, :, :n]), (layer, which)
    retry = eng.generate(x[:, :0].new_tensor([[5, 6, 7]]), cache=cache, **kw)
    fresh = eng.new_cache(1, 30 + 64 + 32)
    eng.encode(x, cache=fresh)
    assert torch.equal(retry.new_tokens, eng.generate(x[:, :0].new_tensor([[5, 6, 7]]), cache=fresh, **kw).new_tokens)


def test_dgemma_disable_kernels_switches_the_commit_path_and_refuses_unknown_names(monkeypatch):
    from dgemma.errors import DgemmaError
    from dgemma.steps import _view_commit_fits

    eng = engine(canvas=16)
    cache = eng.new_cache(1, 64)
    assert _view_commit_fits(cache, 16)
    monkeypatch.setenv("DGEMMA_DISABLE_KERNELS", "view_commit, residual_norm")
    assert not _view_commit_fits(cache, 16)
    monkeypatch.setenv("DGEMMA_DISABLE_KERNELS", "qkv_fusion,turbo")
    with pytest.raises(DgemmaError, match="DGEMMA_DISABLE_KERNELS names turbo; expected some of qkv_fusion, "
                                          "residual_norm, view_commit, norm_quant, moe_contiguous, fp8_dense, fp8_moe, "
                                          "shared_experts, split_kv"):
        _view_commit_fits(cache, 16)


# -- running a step ahead of the stop flags -----------------------------------------------------------


def _counting(monkeypatch):
    """Count the fused steppers' calls."""
    calls = []
    original = FusedHeadStepper.__call__

    def call(self, canvas, soft, n, finished):
        calls.append(n)
        return original(self, canvas, soft, n, finished)
    monkeypatch.setattr(FusedHeadStepper, "__call__", call)
    return calls


def _generate_with_events(eng, x, **kw):
    events = []
    res = eng.generate(x, stream=events.append, **kw)
    return res, [(e.kind, e.block, e.step, e.tokens.clone(), e.finished.clone()) for e in events]


def _same_run(a, b):
    (res_a, ev_a), (res_b, ev_b) = a, b
    assert torch.equal(res_a.sequences, res_b.sequences)
    assert res_a.steps_per_block == res_b.steps_per_block
    assert torch.equal(torch.as_tensor(res_a.tokens_per_forward), torch.as_tensor(res_b.tokens_per_forward))
    assert [e[:3] for e in ev_a] == [e[:3] for e in ev_b]
    for x, y in zip(ev_a, ev_b):
        assert torch.equal(x[3], y[3]) and torch.equal(x[4], y[4])


def _stop_kw(eng, x, confidence):
    """generate's arguments stopping on the mean entropy alone at a threshold this model's rows cross at different
    steps, so that rows stop apart and blocks stop before their last step: "early" (5.5: after 1 or 2 of 8 steps)
    or "late" (the lowest of a few thresholds at which at least two of the four blocks stop before their last step:
    after 6 to 8 steps; which one depends on the CPU's floating-point summation order), or a number."""
    kw = dict(seed=3, max_new_tokens=64, max_denoising_steps=8, eos_token_id=[], pad_token_id=0,
              stability_threshold=0)
    if confidence == "early":
        return dict(kw, confidence_threshold=5.5)
    if confidence != "late":
        return dict(kw, confidence_threshold=confidence)
    for late in (4.5, 4.6, 4.7, 4.8, 4.9, 5.0):
        blocks = eng.generate(x, confidence_threshold=late, **kw).steps_per_block
        if sum(max(rows) < 8 for rows in blocks) >= 2:
            return dict(kw, confidence_threshold=late)
    pytest.fail("no threshold of 4.5..5.0 stops two blocks early")


@pytest.mark.parametrize("confidence", ["early", "late"])
def test_running_a_step_ahead_of_the_stop_flags_gives_the_results_of_stopping_at_once(monkeypatch, confidence):
    eng = engine(fused=True, canvas=16)
    x = ids(2, 20)
    kw = _stop_kw(eng, x, confidence)
    calls = _counting(monkeypatch)
    ahead = _generate_with_events(eng, x, **kw)
    ahead_calls = list(calls)
    monkeypatch.setattr(FusedHeadStepper, "rewind", None)  # the loop reads each step's flags before the next
    calls.clear()
    at_once = _generate_with_events(eng, x, **kw)
    _same_run(ahead, at_once)
    # Blocks that stopped early ran one step past the stop, undone: one call more per such block.
    early = sum(max(rows) < 8 for rows in at_once[0].steps_per_block)
    assert early >= 2 and len(calls) == sum(max(rows) for rows in at_once[0].steps_per_block)
    assert len(ahead_calls) == len(calls) + early


def test_a_step_run_ahead_past_the_stop_leaves_the_random_stream_as_it_was(monkeypatch):
    """The undo is what keeps the stream: without it the next block draws other numbers."""
    eng = engine(fused=True, canvas=16)
    x = ids(2, 20)
    kw = _stop_kw(eng, x, "late")
    at_once = _generate_with_events(eng, x, **kw)
    monkeypatch.setattr(FusedHeadStepper, "rewind", lambda self: None)
    forgetful = _generate_with_events(eng, x, **kw)
    c = 16
    assert torch.equal(forgetful[0].sequences[:, :20 + c], at_once[0].sequences[:, :20 + c])  # the first block
    assert not torch.equal(forgetful[0].sequences, at_once[0].sequences)


def test_a_non_finite_step_is_reported_at_its_step_when_the_loop_runs_ahead(monkeypatch):
    def failure(rewind):
        eng = engine(fused=True)
        eng.model.w.layers[1].post_ff_norm.fill_(float("nan"))
        if not rewind:
            monkeypatch.setattr(FusedHeadStepper, "rewind", None)
        events = []
        with pytest.raises(NonFiniteError) as e:
            eng.generate(ids(1, 10), seed=0, max_new_tokens=32, max_denoising_steps=4, stream=events.append)
        return str(e.value), events

    ahead, ahead_events = failure(rewind=True)
    at_once, at_once_events = failure(rewind=False)
    assert ahead == at_once and ahead_events == at_once_events == []  # the first step is not finite
    assert "block 0, denoising step 4, first non-finite output at decoder layer 1" in ahead


def test_the_graph_stepper_runs_ahead_and_undoes_like_the_eager_one(monkeypatch):
    """Replayed steps run ahead of the stop flags too: the step past each early stop is a replay that is undone,
    and the tokens, events and steps are those of eager steps stopping at once."""
    import dgemma.generation as generation

    eng = engine(fused=True, canvas=16)
    x = ids(2, 20)
    kw = _stop_kw(eng, x, "late")
    monkeypatch.setattr(FusedHeadStepper, "rewind", None)
    at_once = _generate_with_events(eng, x, **kw)
    monkeypatch.undo()
    factory = ReplayCheckingFactory()
    monkeypatch.setattr(generation, "make_stepper", graphed(eng, factory))
    cache = eng.new_cache(2, 20 + 64)
    res, events = _generate_with_events(eng, x, cache=cache, **kw)
    _same_run((res, events), at_once)
    stepper = cache._graph_stepper
    early = sum(max(rows) < 8 for rows in at_once[0].steps_per_block)
    assert early >= 2 and stepper.failed is None
    # Every step, the undone ones included, is a capture's eager run or a replay (commits aside).
    steps = sum(max(rows) for rows in at_once[0].steps_per_block) + early
    commits = len(at_once[0].steps_per_block) - 1
    assert stepper.replays + stepper.captures == steps + commits


# -- the stop decided on the device (DGEMMA_STOP_ON_DEVICE=1) -------------------------------------------


def _reads_per_block(monkeypatch):
    """Count the graph stepper's end-of-block reads, and any other host read of a step's flags."""
    import dgemma.generation as generation

    reads = {"blocks": 0, "steps": 0}
    end = CudaGraphStepper.end_block

    def end_block(self, run):
        reads["blocks"] += 1
        return end(self, run)

    read = generation._StepFlags.read

    def step_read(self):
        reads["steps"] += 1
        return read(self)
    monkeypatch.setattr(CudaGraphStepper, "end_block", end_block)
    monkeypatch.setattr(generation._StepFlags, "read", step_read)
    return reads


@pytest.mark.parametrize("stability, confidence", [(0, "early"), (0, "late"), (1, 5.0), (2, 1e-30)])
def test_stopping_on_the_device_gives_the_results_of_stopping_at_once(monkeypatch, stability, confidence):
    """Every step of a block queued at once, gated on the device, one read per block: the tokens, steps per row,
    passes, draft events and random stream of the host loop stopping at once; the steps past the stop ran nothing
    (rows stopping apart, blocks stopping early or at their last step, the stability history across steps)."""
    import dgemma.generation as generation

    eng = engine(fused=True, canvas=16)
    x = ids(2, 20)
    kw = dict(_stop_kw(eng, x, confidence), stability_threshold=stability)
    monkeypatch.setattr(FusedHeadStepper, "rewind", None)  # the host loop reads each step's flags before the next
    at_once = _generate_with_events(eng, x, **kw)
    monkeypatch.undo()
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "1")
    factory = ReplayCheckingFactory()
    monkeypatch.setattr(generation, "make_stepper", graphed(eng, factory))
    reads = _reads_per_block(monkeypatch)
    cache = eng.new_cache(2, 20 + 64)
    on_device = _generate_with_events(eng, x, cache=cache, **kw)
    _same_run(on_device, at_once)
    stepper = cache._graph_stepper
    blocks = at_once[0].steps_per_block
    assert stepper.stops_on_device and stepper.failed is None
    assert reads == {"blocks": len(blocks), "steps": 0}
    # Two gated graphs (the first step, the later ones) and the commit pass; every queued step after a key's first
    # is a replay, and a replay past its block's stop runs nothing.
    gated = [g for g in factory.graphs if isinstance(g, ConditionalReplayGraph)]
    assert len(gated) == 2 and stepper.captures == 3
    ran = sum(g.replays for g in gated) + 2
    assert ran == sum(max(rows) for rows in blocks)
    # Queued past a stop: a replay that runs nothing, or (a key not yet captured) nothing queued at all.
    skipped = sum(g.skipped for g in gated)
    assert skipped <= 8 * len(blocks) - ran
    if confidence == "early":  # every block stops after 1 or 2 of its 8 steps
        assert max(max(rows) for rows in blocks) <= 2 and skipped > 0


def test_stopping_on_the_device_reports_a_non_finite_step_as_the_host_loop_does(monkeypatch):
    import dgemma.generation as generation

    def failure(on_device):
        eng = engine(fused=True)
        eng.model.w.layers[1].post_ff_norm.fill_(float("nan"))
        if on_device:
            monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "1")
            monkeypatch.setattr(generation, "make_stepper", graphed(eng, ReplayCheckingFactory()))
        events = []
        with pytest.raises(NonFiniteError) as e:
            eng.generate(ids(1, 10), seed=0, max_new_tokens=32, max_denoising_steps=4, stream=events.append)
        return str(e.value), events

    at_once = failure(on_device=False)
    assert failure(on_device=True) == at_once
    assert "block 0, denoising step 4, first non-finite output at decoder layer 1" in at_once[0]


def test_a_conditional_capture_that_fails_leaves_the_other_graphs_and_stops_on_the_host(monkeypatch, caplog):
    """Capturing a gated step fails (a torch or driver without conditional nodes in practice): that block finishes
    eagerly, the cache's later generations stop on the host with the step and commit graphs still replayed, and
    the results are those of stopping at once."""
    import dgemma.generation as generation

    eng = engine(fused=True, canvas=16)
    x = ids(2, 20)
    kw = _stop_kw(eng, x, "late")
    capacity = 2 * (20 + 64)
    monkeypatch.setattr(FusedHeadStepper, "rewind", None)
    cache = eng.new_cache(2, capacity)
    at_once = [_generate_with_events(eng, x, cache=cache, **kw),
               _generate_with_events(eng, x, cache=cache, **dict(kw, seed=4))]
    monkeypatch.undo()
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "1")

    class NoConditionals(ReplayCheckingFactory):
        def capture_conditional(self, fn, pred, device, writes):
            raise RuntimeError("conditional nodes are not supported here")

    monkeypatch.setattr(generation, "make_stepper", graphed(eng, NoConditionals()))
    cache = eng.new_cache(2, capacity)
    with caplog.at_level("WARNING", logger="dgemma"):
        first = _generate_with_events(eng, x, cache=cache, **kw)
    stepper = cache._graph_stepper
    assert "blocks stop on the host again" in caplog.text and "conditional nodes are not supported" in caplog.text
    assert stepper.failed is None and stepper.conditional_failed and stepper.captures == 1  # the commit pass
    second = _generate_with_events(eng, x, cache=cache, **dict(kw, seed=4))
    assert not stepper.stops_on_device and stepper.failed is None and stepper.captures == 3  # + first, later steps
    _same_run(first, at_once[0])
    _same_run(second, at_once[1])


def test_a_caches_block_states_are_bounded():
    """One DeviceBlock per (steps, stability, confidence): generations with ever new settings keep the latest few."""
    from dgemma.steps import MAX_DEVICE_BLOCKS

    eng = engine(fused=True, canvas=16)
    cache = eng.new_cache(1, 64)
    eng.encode(ids(1, 20), cache=cache)
    sampler = PhiloxHeadSampler(eng.model, GenerationSettings(), torch.Generator().manual_seed(0), eng.device)
    stepper = CudaGraphStepper(eng.model, cache, sampler, graph_factory=ReplayCheckingFactory())
    done = torch.zeros(1, dtype=torch.bool)
    for steps in range(3, 9):
        run = stepper.begin_block(ids(1, 16), done, GenerationSettings(max_denoising_steps=steps))
        assert run.drafts.shape[0] == steps and bool(run.go) and int(run.ran) == 0
    assert [key[0] for key in stepper.blocks] == list(range(9 - MAX_DEVICE_BLOCKS, 9))


def test_stop_on_device_setting_is_checked_and_falls_back_where_conditionals_cannot_be_captured(monkeypatch, caplog):
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "yes")
    with pytest.raises(DgemmaError, match="DGEMMA_STOP_ON_DEVICE = 'yes' is not a stop setting; expected one of 0, 1"):
        stops_on_device(ReplayCheckingFactory())
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "0")
    assert not stops_on_device(ReplayCheckingFactory())
    monkeypatch.setenv("DGEMMA_STOP_ON_DEVICE", "1")
    assert stops_on_device(ReplayCheckingFactory())
    monkeypatch.delattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node", raising=False)
    with caplog.at_level("WARNING", logger="dgemma"):
        assert not stops_on_device(CudaGraphFactory())
    assert "DGEMMA_STOP_ON_DEVICE=1 is off" in caplog.text and "conditional graph nodes" in caplog.text


# -- teacher forcing (per-layer parity checks) ----------------------------------------------------------


def test_decoder_layer_outputs_on_the_decoders_own_inputs_give_its_states():
    """Each layer on the input the free-running decoder gave it: the same outputs (the reference ops in fp32; the
    free run feeds the next layer's normed input from the fused residual op, teacher forcing norms it again)."""
    eng = engine(canvas=16)
    cache = eng.encode(ids(2, 20))
    canvas = ids(2, 16, seed=9)
    states = [x for _, x in eng.model._decoder_states(canvas, cache, None)]
    outs = eng.model.decoder_layer_outputs(canvas, cache, states[:-1])
    assert len(outs) == len(eng.config.layers)
    for got, want in zip(outs, states[1:]):
        assert rel(got, want) < 1e-5
    # another input to one layer changes that layer's output only
    moved = list(states[:-1])
    moved[1] = moved[1] * 1.5
    outs2 = eng.model.decoder_layer_outputs(canvas, cache, moved)
    assert rel(outs2[1], outs[1]) > 1e-3 and all(torch.equal(a, b) for i, (a, b) in enumerate(zip(outs2, outs)) if i != 1)


def test_decoder_layer_outputs_wants_one_input_per_layer():
    from dgemma.errors import DgemmaError

    eng = engine(canvas=16)
    cache = eng.encode(ids(1, 8))
    canvas = ids(1, 16, seed=2)
    states = [x for _, x in eng.model._decoder_states(canvas, cache, None)]
    with pytest.raises(DgemmaError, match=rf"one input per layer \({len(eng.config.layers)}\), got 1"):
        eng.model.decoder_layer_outputs(canvas, cache, states[:1])


def test_layer_parity_tool_reports_zero_for_one_backend_against_itself(tmp_path):
    """bench/layer_parity.py on the CPU (reference backend against the reference): every comparison exact, and
    with --fp32 the bf16-vs-fp32 distance reported (nonzero)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "parity.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "layer_parity.py"
    r = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--backend", "reference", "--device", "cpu",
                        "--quantization", "none", "--prompt", "9", "--canvas", "8", "--fp32", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    for key in ("decoder", "decoder_on_reference_cache", "decoder_teacher_forced"):
        assert rep[key] and all(row["rel"] == 0 for row in rep[key]), key
    assert all(row["k_rel"] == 0 and row["v_rel"] == 0 for row in rep["encoder"])
    assert rep["logits"]["argmax_agreement"] == 1.0
    assert rep["reference_bf16_vs_fp32"]["logits"]["rel"] > 0
    assert "teacher-forced" in r.stdout
