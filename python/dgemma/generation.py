"""The block-diffusion generation loop (backend-agnostic: it only calls the engine and its sampler op)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .errors import DgemmaError, NonFiniteError
from .sampler import GenerationSettings, StableAndConfident, make_sampler
from .steps import ExternalStepper, keep_stopped_rows, make_stepper


@dataclass(slots=True)
class StreamEvent:
    """``kind`` is ``"draft"`` (the argmax canvas after a denoising step) or ``"block"`` (a committed
    block, after EOS padding). ``tokens`` is [B, canvas]; ``step`` counts down N…1 within a block."""

    kind: str
    block: int
    step: int | None
    tokens: torch.Tensor
    finished: torch.Tensor  # bool [B]: rows whose denoising (draft) or generation (block) has finished


@dataclass(slots=True)
class DecoderPass:
    """Yielded by ``generate_stream(..., external_decoder=True)`` before each denoising step: the consumer runs
    the decoder over ``canvas`` [B, C] against ``cache`` with self-conditioning input ``soft`` — alone
    (``engine.model.denoise_hidden(canvas, cache, soft)``) or together with other generations' passes
    (``engine.model.denoise_hidden_rows``, as the server's scheduler does) — and sends the final-normed
    hidden states [B, C, H] back with the generator's ``send``."""

    canvas: torch.Tensor
    soft: torch.Tensor | None
    cache: KVCache

    @property
    def kind(self) -> str:
        return "decoder_pass"


@dataclass(slots=True)
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + blocks * canvas]: prompt followed by the new ids, like transformers
    prompt_length: int
    steps_per_block: list[list[int]]  # [block][row]: decoder passes that row used in that block
    tokens_per_forward: torch.Tensor  # [B]: non-pad new tokens / decoder passes
    timings: dict[str, float]
    cache: KVCache | None = None
    eos_token_ids: list[int] = field(default_factory=list)  # the EOS ids this generation stopped at
    pad_token_id: int | None = None  # the id that replaced the tokens after EOS
    texts: list[str] | None = None  # set by the text front end (dgemma.text)
    responses: list = field(default_factory=list)  # chat.Response per row, for chat inputs

    @property
    def kind(self) -> str:
        """``"result"``: the last item of ``generate_stream``, so a loop dispatching on ``.kind`` (``"draft"``,
        ``"block"``) sees a kind on every item."""
        return "result"

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[0]

    @property
    def thinking(self) -> str | None:
        return self.responses[0].thinking if self.responses else None

    @property
    def tool_calls(self) -> list[dict]:
        return self.responses[0].tool_calls if self.responses else []


def _emit(event: StreamEvent):
    """Yield a stream event; a value sent back for it is a mistake (only a DecoderPass takes an answer)."""
    sent = yield event
    if sent is not None:
        raise DgemmaError(f"a {event.kind} event was answered with send({type(sent).__name__}): only a DecoderPass "
                          f"takes an answer (generate_stream(..., external_decoder=True)); iterate with next() or a "
                          f"for loop")


def _finalize_block(seq: torch.Tensor, finished: torch.Tensor, canvas: int, max_length: int,
                    eos: torch.Tensor | None, pad: int | None) -> torch.Tensor:
    """Mark rows that hit EOS (or the length budget) and pad what follows an EOS; rows finished
    earlier get a block of pad."""
    done_now = torch.zeros_like(finished)
    if seq.shape[1] >= max_length:
        done_now |= True
    if eos is not None:
        done_now |= torch.isin(seq[:, -canvas:], eos).any(dim=-1)
    previously = finished
    finished = previously | done_now
    if pad is not None and bool(finished.any()):
        seq[previously, -canvas:] = pad
        if eos is not None and bool(done_now.any()):
            new = seq[:, -canvas:]
            is_eos = torch.isin(new, eos)
            count = is_eos.cumsum(dim=-1)
            new[(count > 0) & ~((count == 1) & is_eos)] = pad
    return finished


def run_generation(engine, ids: torch.Tensor, attention_mask: torch.Tensor | None, settings: GenerationSettings, *,
                   eos_token_ids: list[int] | None, pad_token_id: int | None, generator: torch.Generator | None,
                   canvas: torch.Tensor | None, cache: KVCache, image_features: torch.Tensor | None = None,
                   mm_token_type_ids: torch.Tensor | None = None, external_decoder: bool = False,
                   video_features: torch.Tensor | None = None, cache_length: int | None = None
                   ) -> Iterator[StreamEvent | DecoderPass | GenerationResult]:
    """Yield stream events, then the :class:`GenerationResult`. Inputs are already validated (ids, mask,
    cache room; ``image_features`` fill the prompt's image placeholders). With ``external_decoder`` a
    :class:`DecoderPass` is yielded before each step and the consumer sends the decoder's output back.

    The cache is changed in a transaction committed just before the result is yielded: an exception
    (in the model, or in the consumer of an event, which reaches the generator as ``GeneratorExit``
    when it is closed) leaves the cache as it was before the call."""
    cfg, device = engine.config, engine.device
    b, t = ids.shape
    c = cfg.canvas_length
    past = cache.length
    n_blocks = math.ceil(settings.max_new_tokens / c)
    max_length = t + past + settings.max_new_tokens
    eos = torch.tensor(eos_token_ids, device=device) if eos_token_ids else None
    with cache.transaction() as undo:
        if cache_length is not None and cache.length != cache_length:
            # The call's checks (room, positions) were made against the cache as it was when the call was made;
            # a stream starts at its first step, and the cache was used in between.
            raise DgemmaError(f"the cache held {cache_length} tokens when this generation was made and holds "
                              f"{cache.length} at its first step: it was used in between (make the stream after "
                              f"that use, or give it its own cache)")
        sampler = make_sampler(engine, settings, generator)  # a seeded sampler draws its key here
        if external_decoder:
            stepper = ExternalStepper(engine.model, cache, sampler)
        else:
            stepper = make_stepper(engine, cache, sampler)
        finished_seq = torch.zeros(b, dtype=torch.bool, device=device)
        passes = torch.zeros(b, dtype=torch.int, device=device)
        timings = {"encode_s": 0.0, "denoise_s": 0.0}
        start = time.perf_counter()
        seq, steps_per_block = yield from _blocks(engine, ids, attention_mask, settings, generator, canvas, cache,
                                                  image_features, mm_token_type_ids, video_features, stepper,
                                                  finished_seq, passes,
                                                  eos, max_length, pad_token_id, timings, undo, n_blocks)
    timings["total_s"] = time.perf_counter() - start
    new = seq[:, t:]
    # NOTE: without a pad id the count stays a Python int, as in transformers: int / int-tensor rounds
    # differently from int-tensor / int-tensor.
    valid = (new != pad_token_id).sum(dim=-1) if pad_token_id is not None else new.shape[1]
    yield GenerationResult(sequences=seq, prompt_length=t, steps_per_block=steps_per_block,
                           tokens_per_forward=valid / passes, timings=timings, cache=cache,
                           eos_token_ids=list(eos_token_ids or []), pad_token_id=pad_token_id)


def _blocks(engine, ids, attention_mask, settings, generator, canvas, cache, image_features, mm_token_type_ids,
            video_features, stepper, finished_seq, passes, eos, max_length, pad_token_id, timings, undo, n_blocks):
    """The block loop of :func:`run_generation`: (sequences, steps per block)."""
    c, v = engine.config.canvas_length, engine.config.vocab_size
    b = ids.shape[0]
    device = engine.device
    seq = ids
    steps_per_block: list[list[int]] = []
    for block in range(n_blocks):
        t0 = time.perf_counter()
        if block == 0:
            engine.model.encode(ids, cache, attention_mask, image_features, mm_token_type_ids, video_features)
        else:
            stepper.commit(seq[:, -c:])  # the commit pass of the previous block
        timings["encode_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        # NOTE: the random canvas is drawn even when one is supplied, as the reference loop does, so
        # that the rest of the random stream is unchanged.
        current = torch.randint(0, v, (b, c), generator=generator, device=device)
        if block == 0 and canvas is not None:
            current = canvas
        argmax, block_passes = yield from _denoise_block(engine, cache, current, settings, stepper, finished_seq,
                                                         passes, block, undo)
        steps_per_block.append(block_passes.tolist())
        timings["denoise_s"] += time.perf_counter() - t0
        seq = torch.cat([seq, argmax], dim=-1)
        finished_seq = _finalize_block(seq, finished_seq, c, max_length, eos, pad_token_id)
        with undo.suspended():
            yield from _emit(StreamEvent("block", block, None, seq[:, -c:], finished_seq.clone()))
        if bool(finished_seq.all()):
            break
    return seq, steps_per_block


def _denoise_block(engine, cache, current, settings, stepper, finished_seq, passes, block, undo=None):
    """Denoise one block: N…1 steps (a decoder pass and the sampler's draw, :mod:`dgemma.steps`) until every
    row stops.

    Rows that have stopped keep their canvas, argmax and self-conditioning input while the others
    continue (transformers runs them through the decoder all the same).

    Whether to stop is read on the host once per step (the step's "all rows stopped" and "all finite"
    flags). A stepper that can undo a step's draw (``rewind``: a counter-based random stream) runs one step
    ahead: step n-1 is queued before step n's flags are read, so the device never waits for the host; when
    step n turns out to be the last, step n-1 is undone. It changed nothing: every row had stopped, so every
    row kept its state, and the rewound stream draws the same numbers next. Results, events and their order
    are those of stopping at once."""
    if getattr(stepper, "stops_on_device", False):
        return (yield from _denoise_block_on_device(engine, cache, current, settings, stepper, finished_seq, passes,
                                                    block, undo))
    device = engine.device
    b = current.shape[0]
    argmax, soft = current, None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
    block_passes = torch.zeros(b, dtype=torch.int, device=device)
    ahead = not stepper.external and callable(getattr(stepper, "rewind", None))
    pending: _StepFlags | None = None  # the step ahead of which the loop runs
    for step in range(settings.max_denoising_steps, 0, -1):
        active = ~(finished | finished_seq)
        passes += active
        block_passes += active
        try:
            if stepper.external:
                with undo.suspended() if undo is not None else contextlib.nullcontext():
                    h = yield DecoderPass(current, soft, cache)
                draw = stepper.draw(h, current, step, finished)
            else:
                draw = stepper(current, soft, step, finished)
        except Exception as e:
            # The step before decides first: it may have been the last (then this one never ran) or not finite.
            if pending is not None and (yield from _settle(pending, engine, cache, block, undo)):
                stepper.rewind()
                return argmax, block_passes
            if isinstance(e, NonFiniteError):
                raise _located(e, engine, cache, current, soft, block, step) from None
            raise
        if soft is not None:  # no row has stopped before the block's first draw
            draw = keep_stopped_rows(draw, finished, argmax, current, soft)
        finished = finished | stopper(draw.argmax, draw.mean_entropy)
        flags = _StepFlags(step, finished, draw, inputs=(current, soft))
        current, argmax, soft = draw.next_canvas, draw.argmax, draw.soft
        if not ahead:
            if (yield from _settle(flags, engine, cache, block, undo)):
                break
            continue
        if pending is not None:
            try:
                done = yield from _settle(pending, engine, cache, block, undo)
            except BaseException:
                stepper.rewind()
                raise
            if done:
                stepper.rewind()  # this step ran past the stop; every row kept its state
                pending = None
                break
        pending = flags
    if pending is not None:
        yield from _settle(pending, engine, cache, block, undo)
    return argmax, block_passes


def _denoise_block_on_device(engine, cache, current, settings, stepper, finished_seq, passes, block, undo):
    """:func:`_denoise_block` with the stop decided on the device (``DGEMMA_STOP_ON_DEVICE=1``, CUDA graphs with
    conditional nodes): the host queues all N steps without reading anything; a step runs only while some row has
    not stopped and every step so far was finite, and records its argmax canvas and finished rows
    (:meth:`~dgemma.steps.CudaGraphStepper.begin_block`). Then the block's one read (steps run, finiteness): the
    same draft events, results and random stream as stopping at once, the events once the block is done."""
    n = settings.max_denoising_steps
    run = stepper.begin_block(current, finished_seq, settings)
    for step in range(n, 0, -1):
        stepper.gated_step(run, step, first=step == n)
    ran, bad = stepper.end_block(run)
    for k in range(ran):
        if bad and k == ran - 1:  # the last step run was not finite: its inputs are still in place
            row = int(run.bad.nonzero()[0, 0])
            raise _located(NonFiniteError(f"the logits of row {row} are not finite"), engine, cache, stepper.canvas,
                           None if k == 0 else stepper.soft, block, n - k)
        with undo.suspended() if undo is not None else contextlib.nullcontext():
            yield from _emit(StreamEvent("draft", block, n - k, run.drafts[k].clone(), run.finished_after[k].clone()))
    block_passes = run.block_passes.clone()
    passes += block_passes
    return run.argmax.clone(), block_passes


class _StepFlags:
    """A step's stop and finiteness flags on their way to the host (copied without waiting for the device),
    with what its stream event and a non-finite error need."""

    __slots__ = ("step", "host", "ready", "argmax", "finished", "mean_entropy", "inputs")

    def __init__(self, step: int, finished: torch.Tensor, draw, inputs):
        flags = torch.stack((finished.all(), torch.isfinite(draw.mean_entropy).all()))
        self.ready = None
        if flags.is_cuda:
            self.host = torch.empty(2, dtype=torch.bool, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = flags
        self.step, self.argmax, self.finished = step, draw.argmax, finished.clone()
        self.mean_entropy, self.inputs = draw.mean_entropy, inputs

    def read(self) -> tuple[bool, bool]:
        """(every row stopped, every mean entropy finite); waits for the step (the one host sync per step)."""
        if self.ready is not None:
            self.ready.synchronize()
        done, ok = self.host.tolist()
        return done, ok


def _settle(flags: _StepFlags, engine, cache, block: int, undo):
    """Read a step's flags: raise if it was not finite, else yield its draft event; whether the block is done."""
    done, ok = flags.read()
    if not ok:
        row = int((~torch.isfinite(flags.mean_entropy)).nonzero()[0, 0])
        raise _located(NonFiniteError(f"the logits of row {row} are not finite"), engine, cache, *flags.inputs, block,
                       flags.step)
    with undo.suspended() if undo is not None else contextlib.nullcontext():
        yield from _emit(StreamEvent("draft", block, flags.step, flags.argmax, flags.finished))
    return done


def _located(e: NonFiniteError, engine, cache, canvas, soft, block: int, step: int) -> NonFiniteError:
    """``e`` with the block, step and (found by running the decoder again, checking each layer's output)
    the first layer whose output is not finite."""
    where = f"block {block}, denoising step {step}"
    try:
        layer = engine.model.first_nonfinite_layer(canvas, cache, soft)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the error itself stands
        layer = None
    if layer is not None:
        where += f", first non-finite output at decoder layer {layer}"
    return NonFiniteError(f"{e} ({where}): the weights or inputs produce NaN/Inf")


def denoise_block(engine, cache: KVCache, canvas: torch.Tensor, settings: GenerationSettings, sampler,
                  finished_seq: torch.Tensor | None = None, *, commit: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block exactly as ``generate`` runs it (the same stepper), without events: (argmax canvas [B, C],
    passes per row [B]). With ``commit`` the block's tokens are then encoded into ``cache`` by that stepper's
    commit pass, as ``generate`` does before the next block (graph-replayed where the steps are)."""
    b = canvas.shape[0]
    if finished_seq is None:
        finished_seq = torch.zeros(b, dtype=torch.bool, device=canvas.device)
    passes = torch.zeros(b, dtype=torch.int, device=canvas.device)
    stepper = make_stepper(engine, cache, sampler)
    events = _denoise_block(engine, cache, canvas, settings, stepper, finished_seq, passes, 0)
    while True:
        try:
            next(events)
        except StopIteration as done:
            argmax, block_passes = done.value
            break
    if commit:
        stepper.commit(argmax)
    return argmax, block_passes


def drive(events: Iterator, stream: Callable | None) -> GenerationResult:
    """Run ``events`` to its result, calling ``stream`` on each event. An exception (``stream``'s own
    included) closes the generator at once, so its cache transaction is rolled back before it propagates."""
    try:
        for item in events:
            if isinstance(item, GenerationResult):
                return item
            if stream is not None:
                stream(item)
    except BaseException:
        if hasattr(events, "close"):
            events.close()
        raise
    raise DgemmaError("generation ended without a result")  # unreachable: run_generation always yields one
