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
  result, then captures; the later calls replay. Eager and replayed steps launch the same kernels with the same arguments, so the
  tokens are the same with and without graphs.

A graph holds the addresses of the cache it was captured against, so graphs belong to one
:class:`~dgemma.cache.KVCache` (kept on it: a chat session reusing its cache reuses its graphs).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from . import _ext
from .cache import KVCache, PrefixView, prefix_bucket
from .errors import DgemmaError
from .quant import Fp8Weight
from .sampler import Draw, PhiloxHeadSampler, TorchStreamSampler

log = logging.getLogger("dgemma")

# Graphs kept per cache: the first step, the later steps and the commit pass of two prefix buckets.
MAX_GRAPHS_PER_CACHE = 6


class ExternalStepper:
    """The decoder pass is run by the consumer of ``generate_stream(..., external_decoder=True)`` (see
    :class:`dgemma.generation.DecoderPass`); this only draws from its hidden states."""

    external = True

    def __init__(self, model, cache: KVCache, sampler):
        self.model, self.cache, self.sampler = model, cache, sampler

    def commit(self, ids: torch.Tensor) -> None:
        self.model.encode(ids, self.cache)

    def draw(self, h, canvas: torch.Tensor, n: int, finished: torch.Tensor) -> Draw:
        if not isinstance(h, torch.Tensor) or h.shape[:2] != canvas.shape:
            raise DgemmaError(f"a DecoderPass must be answered with the hidden states [B, C, H] of its canvas "
                              f"{list(canvas.shape)}; got {h if not isinstance(h, torch.Tensor) else list(h.shape)}")
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
    __slots__ = ("graph", "out")

    def __init__(self, graph, out: Draw):
        self.graph, self.out = graph, out


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

    def _capture(self, key: tuple, fn) -> None:
        """Capture ``fn`` for ``key`` (its eager run already happened); on failure, log why and stay eager."""
        try:
            graph, out = self.graph_factory.capture(fn, self.cache.device)
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
            self.failed = f"{type(e).__name__}: {e}"
            self.graph_factory.recover(self.cache.device)
            log.warning("dgemma: CUDA graph capture failed, denoising steps run without graphs (%s)", self.failed)
            return
        self.captures += 1
        self.graphs[key] = _Graph(graph, out)
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
    are thread-local: another thread's CUDA calls (a server's) cannot invalidate it, nor it them."""

    def capture(self, fn, device: torch.device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    def recover(self, device: torch.device) -> None:
        """After a failed capture: wait for the device, so that an error of the aborted capture surfaces here
        (and is cleared) rather than in the next launch."""
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the eager step that follows reports a broken device itself
            pass


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
    return stepper


__all__ = ["CudaGraphStepper", "FusedHeadStepper", "TorchStreamStepper", "graphs_supported", "make_stepper",
           "prefix_bucket"]
