"""One denoising step of a canvas (the decoder forward and the sampler's draw), eager or replayed from a
CUDA graph.

``generate``'s block loop calls a stepper ``(canvas, soft, n, finished) -> Draw`` once per step:

- :class:`TorchStreamStepper`: the decoder and transformers' random stream (the parity oracle);
- :class:`FusedHeadStepper`: the decoder over a :class:`~dgemma.cache.PrefixView` (prefix lengths on the
  device, planned for the length's bucket) and the fused head's :meth:`~dgemma.sampler.PhiloxHeadSampler.draw`,
  whose step scalars live in device buffers: nothing in the step depends on a host value that changes
  between the steps of a bucket;
- :class:`CudaGraphStepper`: the same step captured once per (first step or not, prefix bucket, padding, the
  sampler's launch settings) as a CUDA graph over static input buffers and replayed. The first call of a key
  runs the step eagerly (which also warms up lazily initialised kernels and workspaces) and returns that
  result, then captures; the later calls replay. Eager and replayed steps launch the same kernels with the
  same arguments, so the tokens are the same with and without graphs.

A graph holds the addresses of the cache it was captured against, so graphs belong to one
:class:`~dgemma.cache.KVCache` (kept on it: a chat session reusing its cache reuses its graphs).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import weakref
from collections import OrderedDict

import torch

from . import _ext
from .cache import KVCache, PrefixView, prefix_bucket
from .errors import DgemmaError
from .quant import Fp8Weight
from .sampler import Draw, PhiloxHeadSampler, StableAndConfident, TorchStreamSampler

log = logging.getLogger("dgemma")

# Graphs kept per cache: the first step, the later steps and the commit pass of two prefix buckets.
MAX_GRAPHS_PER_CACHE = 6
# Block states (DeviceBlock) kept per cache for DGEMMA_STOP_ON_DEVICE, one per (steps, stability, confidence).
MAX_DEVICE_BLOCKS = 4


def keep_stopped_rows(draw: Draw, finished: torch.Tensor, argmax: torch.Tensor, canvas: torch.Tensor,
                      soft: torch.Tensor) -> Draw:
    """``draw`` with the rows that had stopped (``finished`` [B]) keeping their argmax, canvas and self-conditioning
    input (transformers runs them through the decoder all the same). Device work only."""
    keep = finished[:, None]
    draw.argmax = torch.where(keep, argmax, draw.argmax)
    draw.next_canvas = torch.where(keep, canvas, draw.next_canvas)
    draw.soft = torch.where(keep[..., None], soft, draw.soft)
    return draw


def stop_on_device_setting() -> bool:
    """DGEMMA_STOP_ON_DEVICE: ``1`` runs a block's steps gated on the device (:meth:`CudaGraphStepper.begin_block`),
    ``0`` or unset reads each step's stop flags on the host. Read when a generation starts."""
    return _ext.implementation(None, "DGEMMA_STOP_ON_DEVICE", ("0", "1"), "0", "a stop setting") == "1"


class ExternalStepper:
    """The decoder pass is run by the consumer of ``generate_stream(..., external_decoder=True)`` (see
    :class:`dgemma.generation.DecoderPass`); this only draws from its hidden states."""

    external = True

    def __init__(self, model, cache: KVCache, sampler):
        self.model, self.cache, self.sampler = model, cache, sampler

    def commit(self, ids: torch.Tensor) -> None:
        self.model.encode(ids, self.cache)

    def draw(self, h, canvas: torch.Tensor, n: int, finished: torch.Tensor) -> Draw:
        expected = [*canvas.shape, self.model.cfg.hidden_size]
        dtype = self.model.w.embed.dtype  # the residual stream's
        if not isinstance(h, torch.Tensor) or list(h.shape) != expected or h.dtype != dtype \
                or h.device != canvas.device:
            got = f"{list(h.shape)} {h.dtype} on {h.device}" if isinstance(h, torch.Tensor) else f"{h!r:.60}"
            raise DgemmaError(f"a DecoderPass must be answered with the hidden states of its canvas: a {dtype} "
                              f"tensor {expected} on {canvas.device}; got {got}")
        return self.sampler.step(h, canvas, n, finished)


class TorchStreamStepper:
    external = False

    def __init__(self, model, cache: KVCache, sampler: TorchStreamSampler):
        self.model, self.cache, self.sampler = model, cache, sampler

    def __call__(self, canvas: torch.Tensor, soft: torch.Tensor | None, n: int, finished: torch.Tensor) -> Draw:
        return self.sampler.step(self.model.denoise_hidden(canvas, self.cache, soft), canvas, n, finished)

    def commit(self, ids: torch.Tensor) -> None:
        """The commit pass of a finished block: its tokens encoded into the cache."""
        self.model.encode(ids, self.cache)


class FusedHeadStepper:
    external = False

    def __init__(self, model, cache: KVCache, sampler: PhiloxHeadSampler):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.counter_at_call = sampler.counter

    def body(self, canvas: torch.Tensor, soft: torch.Tensor | None, finished: torch.Tensor,
             prefix: PrefixView) -> Draw:
        """The device part of a step: reads no host value that changes within a bucket (capturable)."""
        h = self.model.denoise_hidden(canvas, self.cache, soft, prefix)
        return self.sampler.draw(h, canvas, finished)

    def __call__(self, canvas: torch.Tensor, soft: torch.Tensor | None, n: int, finished: torch.Tensor) -> Draw:
        self.counter_at_call = self.sampler.counter
        self.sampler.prepare(n)
        return self.body(canvas, soft, finished, self.cache.prefix_view())

    def rewind(self) -> None:
        """Undo the last call's draw: the sampler's stream is counter-based, so the next step draws what the
        undone one did (``generate`` runs a step ahead of reading the stop flags and undoes the step past
        the stop)."""
        self.sampler.counter = self.counter_at_call

    def commit(self, ids: torch.Tensor) -> None:
        """The commit pass through :meth:`~dgemma.model.DiffusionGemmaModel.encode_view` (start positions on the
        device), the same computation a graph replays; the plain encoder where the rings cannot take it."""
        cache = self.cache
        if not _view_commit_fits(cache, ids.shape[1]):
            self.model.encode(ids, cache)
            return
        start, t = cache.length, ids.shape[1]
        cache.save_for_undo(start, t)
        self._encode_view(ids)
        cache.length = start + t

    def _encode_view(self, ids: torch.Tensor) -> None:
        self.model.encode_view(ids, self.cache, self.cache.prefix_view())


class _Graph:
    __slots__ = ("graph", "out", "holds")

    def __init__(self, graph, out: Draw | None, holds=None):
        self.graph, self.out = graph, out
        self.holds = holds  # what the graph reads and writes besides the stepper's buffers (kept alive with it)


class DeviceBlock:
    """One block's state on the device while its steps run gated there (:meth:`CudaGraphStepper.begin_block`): whether
    the block still runs, the steps run, the stopping rule's history, each step's argmax canvas and finished rows,
    the decoder passes per row. One per (steps, stability, confidence), reused by every block with those settings."""

    def __init__(self, key: tuple, batch: int, canvas: int, device: torch.device):
        steps, stability, confidence = key
        i64 = dict(dtype=torch.int64, device=device)
        flag = dict(dtype=torch.bool, device=device)
        self.key = key
        with torch.inference_mode(False):  # written in and outside inference mode (see cuda_moe._workspace)
            self.argmax = torch.zeros(batch, canvas, **i64)
            self.finished_seq = torch.zeros(batch, **flag)
            self.block_passes = torch.zeros(batch, dtype=torch.int32, device=device)
            self.go = torch.ones((), **flag)  # the conditional of every step: no row stopped and all finite so far
            self.ran = torch.zeros((), **i64)  # steps run
            self.bad = torch.zeros(batch, **flag)  # rows whose mean entropy was not finite in the last step run
            self.drafts = torch.zeros(steps, batch, canvas, **i64)
            self.finished_after = torch.zeros(steps, batch, **flag)
            self.stopper = StableAndConfident(stability, confidence)
            if stability:
                self.stopper.history = torch.full((stability, batch, canvas), -1, **i64)
        self.counter = 0  # the sampler's step counter when the block began
        self.stopped = False  # the host has read that the block stopped (a step without a graph yet read `go`)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a gated step writes (a stand-in capture that runs the step puts them back)."""
        history = [] if self.stopper.history is None else [self.stopper.history]
        return [self.argmax, self.block_passes, self.go, self.ran, self.bad, self.drafts, self.finished_after, *history]


class CudaGraphStepper(FusedHeadStepper):
    """:class:`FusedHeadStepper` replayed from CUDA graphs (see the module docstring)."""

    def __init__(self, model, cache: KVCache, sampler: PhiloxHeadSampler, graph_factory=None):
        super().__init__(model, cache, sampler)
        b, c, hidden = cache.batch, model.cfg.canvas_length, model.cfg.hidden_size
        dev = cache.device
        self.canvas = torch.zeros(b, c, dtype=torch.int64, device=dev)
        self.soft = torch.zeros(b, c, hidden, dtype=model.w.embed.dtype, device=dev)
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(b, dtype=torch.int32, device=dev)
        self.commit_ids: dict[int, torch.Tensor] = {}  # static ids of a commit pass, per token count
        self.scalars = sampler.scalars
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.graph_factory = graph_factory or CudaGraphFactory()
        self.captures = self.replays = 0
        self.failed: str | None = None  # why capturing failed (then every step runs eagerly)
        # Why capturing a gated step (a conditional node) failed: then blocks stop on the host again, graphs stay.
        self.conditional_failed: str | None = None
        self.stops_on_device = False  # generate runs the block's steps gated on the device (begin_block)
        self.blocks: dict[tuple, DeviceBlock] = {}

    # The stepper lives on its cache (cache._graph_stepper) and refers to it weakly: no reference cycle, so a dropped
    # cache frees its graphs' memory at once rather than at the collector's next pass.
    @property
    def cache(self) -> KVCache:
        cache = self._cache()
        if cache is None:
            raise DgemmaError("this CUDA graph stepper's cache was freed")
        return cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        self._cache = weakref.ref(cache)

    def bind(self, sampler: PhiloxHeadSampler) -> None:
        """Use this stepper's graphs for a new generation's sampler: it writes its scalars where they read."""
        sampler.scalars = self.scalars
        self.sampler = sampler
        self.counter_at_call = sampler.counter

    @torch.inference_mode()  # its buffers and graphs are made in inference mode (by generate), whoever calls it
    def __call__(self, canvas: torch.Tensor, soft: torch.Tensor | None, n: int, finished: torch.Tensor) -> Draw:
        if self.failed is not None:
            return super().__call__(canvas, soft, n, finished)
        cache, first = self.cache, soft is None
        self.counter_at_call = self.sampler.counter
        self.sampler.prepare(n)
        self.canvas.copy_(canvas)
        if not first:
            self.soft.copy_(soft)
        self.finished.copy_(finished)
        prefix = cache.prefix_view(self.lengths)
        # NOTE: the sampler's launch settings are in the key: a graph replays the values it was captured with, and
        # a later generation on this cache may sample with another entropy bound or confidence threshold.
        key = (first, prefix.bound, cache.has_padding, self.sampler.launch_settings())
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            entry.graph.replay()
            self.replays += 1
            out = entry.out
            # NOTE: copies: the next replay overwrites the graph's outputs, and the caller keeps these.
            return Draw(out.argmax.clone(), out.next_canvas.clone(), out.mean_entropy.clone(), out.soft.clone())
        args = (self.canvas, None if first else self.soft, self.finished, prefix)
        result = self.body(*args)  # this step's result, eagerly; also the warm-up of the capture
        self._capture(key, lambda: self.body(*args))
        return result

    # -- a block's steps gated on the device ------------------------------------------------------------------
    # generate queues every step of a block without reading anything: each replay runs its step only while the
    # block's `go` flag (a conditional graph node) says no row has stopped and every step so far was finite, and
    # the step records its argmax canvas and finished rows. The block's one read (steps run, finiteness) then gives
    # the events and results of stopping at once; the steps queued past the stop run nothing.

    @torch.inference_mode()
    def begin_block(self, canvas: torch.Tensor, finished_seq: torch.Tensor, settings) -> DeviceBlock:
        """Start a block over ``canvas`` [B, C] (host: device copies and fills only, no read)."""
        key = (settings.max_denoising_steps, settings.stability_threshold, settings.confidence_threshold)
        run = self.blocks.get(key)
        if run is None:
            run = self.blocks[key] = DeviceBlock(key, canvas.shape[0], canvas.shape[1], self.cache.device)
            while len(self.blocks) > MAX_DEVICE_BLOCKS:  # the oldest settings' state (its graphs keep theirs alive)
                self.blocks.pop(next(iter(self.blocks)))
        self.canvas.copy_(canvas)
        self.finished.zero_()
        run.finished_seq.copy_(finished_seq)
        run.block_passes.zero_()
        run.go.fill_(True)
        run.ran.zero_()
        run.bad.zero_()
        run.stopper.reset()
        run.counter = self.sampler.counter
        run.stopped = False
        return run

    @torch.inference_mode()
    def gated_step(self, run: DeviceBlock, n: int, first: bool) -> None:
        """Queue step ``n`` of the block (a replay; it runs only while ``run.go``). A key's first step runs eagerly,
        if the block still runs (one host read per new key), and is then captured."""
        self.sampler.prepare(n)  # the step's scalars (fills outside the conditional: harmless past the stop)
        cache = self.cache
        prefix = cache.prefix_view(self.lengths)
        key = ("gated", first, prefix.bound, cache.has_padding, self.sampler.launch_settings(), run.key)
        capturing = self.failed is None and self.conditional_failed is None
        entry = self.graphs.get(key) if capturing else None
        if entry is not None:
            self.graphs.move_to_end(key)
            entry.graph.replay()
            self.replays += 1
            return
        # No graph for this step: it runs eagerly if the block still runs, read on the host (once: a stopped block
        # stays stopped).
        if run.stopped or not bool(run.go):
            run.stopped = True
            return
        self._gated(run, first, prefix)
        if capturing:
            self._capture(key, lambda: self._gated(run, first, prefix), gated_on=run, holds=run)

    def end_block(self, run: DeviceBlock) -> tuple[int, bool]:
        """The block's one read: (steps run, whether the last one was not finite). The sampler's counter then
        stands where stopping at once leaves it."""
        ran, bad = torch.stack((run.ran, run.bad.any().long())).tolist()
        self.sampler.counter = run.counter + ran
        return ran, bool(bad)

    def _gated(self, run: DeviceBlock, first: bool, prefix: PrefixView) -> None:
        """One step on the block's device state (run only while ``run.go``): generate's step, its stopping rule and
        bookkeeping as device work. A step that is not finite changes nothing else: the block stops with that
        step's inputs in place (the error's diagnosis runs the decoder on them)."""
        finished = self.finished
        run.block_passes.add_((~(finished | run.finished_seq)).int())
        draw = self.body(self.canvas, None if first else self.soft, finished, prefix)
        if not first:
            draw = keep_stopped_rows(draw, finished, run.argmax, self.canvas, self.soft)
        done = finished | run.stopper(draw.argmax, draw.mean_entropy)
        bad = ~torch.isfinite(draw.mean_entropy)
        ok = ~bad.any()
        at = run.ran.view(1)
        run.drafts.index_copy_(0, at, draw.argmax[None])
        run.finished_after.index_copy_(0, at, done[None])
        self.canvas.copy_(torch.where(ok, draw.next_canvas, self.canvas))
        self.soft.copy_(torch.where(ok, draw.soft, self.soft))
        run.argmax.copy_(torch.where(ok, draw.argmax, run.argmax))
        finished.copy_(torch.where(ok, done, finished))
        run.bad.copy_(bad)
        run.ran.add_(1)
        run.go.copy_(ok & ~done.all())

    def _capture(self, key: tuple, fn, gated_on: DeviceBlock | None = None, holds=None) -> None:
        """Capture ``fn`` for ``key`` (its eager run already happened), under the conditional ``gated_on.go`` where
        given; on failure, log why and stay eager."""
        try:
            if gated_on is None:
                graph, out = self.graph_factory.capture(fn, self.cache.device)
            else:
                writes = gated_on.tensors() + [self.canvas, self.soft, self.finished]
                graph, out = self.graph_factory.capture_conditional(fn, gated_on.go, self.cache.device, writes)
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
            why = f"{type(e).__name__}: {e}"
            self.graph_factory.recover(self.cache.device)
            if gated_on is not None:
                self.conditional_failed = why
                log.warning("dgemma: capturing a step under a conditional graph node failed; blocks stop on the host "
                            "again (DGEMMA_STOP_ON_DEVICE is off for this cache): %s", why)
                return
            self.failed = why
            log.warning("dgemma: CUDA graph capture failed, denoising steps run without graphs (%s)", self.failed)
            return
        self.captures += 1
        self.graphs[key] = _Graph(graph, out, holds)
        while len(self.graphs) > MAX_GRAPHS_PER_CACHE:
            self.graphs.popitem(last=False)

    @torch.inference_mode()
    def _encode_view(self, ids: torch.Tensor) -> None:
        """The commit pass replayed from a graph per (tokens, prefix bucket, padding), like the steps."""
        if self.failed is not None:
            return super()._encode_view(ids)
        cache, t = self.cache, ids.shape[1]
        buf = self.commit_ids.get(t)
        if buf is None:
            buf = self.commit_ids[t] = torch.empty_like(ids)
        buf.copy_(ids)
        prefix = cache.prefix_view(self.lengths)
        key = ("commit", t, prefix.bound, cache.has_padding)
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            entry.graph.replay()
            self.replays += 1
            return
        self.model.encode_view(buf, cache, prefix)  # this pass, eagerly; then the capture (which runs nothing)
        self._capture(key, lambda: self.model.encode_view(buf, cache, prefix))


def _view_commit_fits(cache: KVCache, t: int) -> bool:
    """Whether a commit of t tokens can go through encode_view: each sliding ring holds t positions (and
    DGEMMA_DISABLE_KERNELS does not name view_commit)."""
    if "view_commit" in _ext.disabled_kernels():
        return False
    return all(not spec.is_sliding or cache.ring_size(i) >= t for i, spec in enumerate(cache.config.layers))


class CudaGraphFactory:
    """Captures a callable as a ``torch.cuda.CUDAGraph`` (the graph's memory in its own pool). Capture errors
    are thread-local: another thread's CUDA calls (a server's) cannot invalidate it, nor it them. A capture that
    fails leaves the process as it found it (see :func:`capturing`)."""

    def capture(self, fn, device: torch.device):
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, device):
            out = fn()
        return graph, out

    def conditional_unsupported(self) -> str | None:
        """Why :meth:`capture_conditional` cannot run here, or None."""
        if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
            return f"torch {torch.__version__} cannot capture conditional graph nodes"
        return None

    def capture_conditional(self, fn, pred: torch.Tensor, device: torch.device, writes=()):
        """Capture ``fn`` as the body of a conditional node: a replay runs it only where the bool CUDA scalar
        ``pred`` is true when the replay reaches it. ``writes``: what ``fn`` writes (unused: a capture runs
        nothing)."""
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, device):
            graph.begin_capture_to_if_node(pred)
            try:
                out = fn()
            finally:
                graph.end_capture_to_conditional_node()
        return graph, out

    def recover(self, device: torch.device) -> None:
        """After a failed capture: wait for the device, so that an error of the aborted capture surfaces here
        (and is cleared) rather than in the next launch."""
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the eager step that follows reports a broken device itself
            pass


_gc_lock = threading.Lock()
_gc_pauses = 0  # captures in progress (any thread) while the collector is paused
_gc_was_enabled = False


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while any thread captures: a collection inside a capture that frees
    an old ``CUDAGraph`` (a dropped cache and its stepper form a cycle) destroys a graph on the capturing thread,
    which CUDA forbids there: the capture was invalidated and failed at random."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


@contextlib.contextmanager
def capturing(graph, device: torch.device):
    """``torch.cuda.graph(graph)`` (thread-local capture errors) on ``device``, with the collector paused, that
    leaves the process as it was when the capture fails. torch's context does not: when ending an invalidated
    capture raises, it leaves its capture stream current on the thread (later work ran there, unordered with the
    default stream) and the device's default generator in its capture state (every later CUDA random draw then
    raised "Offset increment outside graph capture encountered unexpectedly")."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    saved = generator.clone_state()
    # NOTE: the restore inside the device's context: setting a stream also makes its device current.
    with _collector_paused(), torch.cuda.device(index):
        stream = torch.cuda.current_stream(index)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                yield
        except BaseException:
            torch.cuda.set_stream(stream)
            generator.graphsafe_set_state(saved)
            raise


def graphs_supported(engine) -> str | None:
    """Why the denoising step of ``engine`` cannot be captured as a CUDA graph, or None when it can."""
    if engine.device.type != "cuda":
        return "not on a CUDA device"
    if not engine.model.ops.fused_vocab_head(engine, engine.generation_settings):
        return "the fused vocabulary head does not run here (bf16 on the CUDA backend)"
    layer = engine.model.w.layers[0]
    if not isinstance(layer.experts_gate_up, Fp8Weight):
        return "the experts are not FP8 (the bf16 expert path reads its routing on the host)"
    return None


def make_stepper(engine, cache: KVCache, sampler):
    """The stepper ``generate`` runs for ``sampler`` over ``cache``: CUDA graphs when the engine enables them
    and its step can be captured, else eager."""
    model = engine.model
    if isinstance(sampler, TorchStreamSampler):
        return TorchStreamStepper(model, cache, sampler)
    if not getattr(engine, "cuda_graphs", False):
        return FusedHeadStepper(model, cache, sampler)
    stepper = getattr(cache, "_graph_stepper", None)
    if stepper is None:
        why = graphs_supported(engine)
        if why is not None:
            log.warning("dgemma: CUDA graphs are off for this engine: %s", why)
            engine.cuda_graphs = False
            return FusedHeadStepper(model, cache, sampler)
        stepper = cache._graph_stepper = CudaGraphStepper(model, cache, sampler)
    stepper.bind(sampler)
    stepper.stops_on_device = stepper.conditional_failed is None and stops_on_device(stepper.graph_factory)
    return stepper


def stops_on_device(graph_factory) -> bool:
    """Whether a generation's blocks run gated on the device: DGEMMA_STOP_ON_DEVICE=1 and a graph factory that can
    capture conditional nodes (else a warning says why not, and each step's flags are read on the host)."""
    if not stop_on_device_setting():
        return False
    why = graph_factory.conditional_unsupported()
    if why is not None:
        log.warning("dgemma: DGEMMA_STOP_ON_DEVICE=1 is off: %s", why)
    return why is None


__all__ = ["CudaGraphStepper", "DeviceBlock", "FusedHeadStepper", "TorchStreamStepper", "graphs_supported",
           "keep_stopped_rows", "make_stepper", "prefix_bucket", "stops_on_device"]
