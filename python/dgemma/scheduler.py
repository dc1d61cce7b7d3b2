"""Continuous batching of many generations on one engine (the server's worker).

Every scheduling round gives each active request one quantum: a prefill chunk of its prompt, or one
denoising step. The denoising steps of a round run as **one batched decoder pass** over all their
canvases (``model.denoise_hidden_rows``: every op but attention runs once for the batch, attention per
request against its own KV cache); each request then draws from the result with its own sampler and seeded
random stream, and encodes its committed blocks into its own cache. Requests join at the next round and
leave when they finish, so a long prompt (encoded in chunks) or a long answer never stalls the others. At
most ``max_batch`` requests are active; the rest wait in a queue. A request's output does not depend on
what else runs: each row of the batched pass equals that request's pass alone (tested), so the same
request gives the same tokens alone or under load.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .engine import Engine
from .errors import DgemmaError, NonFiniteError, OutOfMemoryError
from .generation import DecoderPass, GenerationResult

PREFILL_CHUNK = 512

log = logging.getLogger("dgemma")


class QueueFullError(DgemmaError):
    """A job the scheduler cannot take now: its queue is full, or it is not running (a server answers 503)."""


# Keywords the scheduler passes to generate_stream itself.
_RESERVED_KWARGS = ("cache", "capacity", "external_decoder", "attention_mask", "stream")


class JobError(str):
    """The payload of an ``"error"`` event: its message (a ``str``), and ``status``, the failure as an HTTP
    server answers it: 400 a request the engine refused (a DgemmaError), 500 a failure inside the engine (any
    other exception), 503 the server shutting down, 499 a cancelled job (the client went away)."""

    status: int

    def __new__(cls, message: str, status: int = 400):
        self = super().__new__(cls, message)
        self.status = status
        return self

    @property
    def internal(self) -> bool:
        return self.status >= 500


@dataclass
class Job:
    """One generation request. ``emit(kind, payload)`` receives, from the worker thread, ``"draft"``
    (a StreamEvent, only with ``drafts``), ``"block"`` (a StreamEvent), ``"done"`` (the GenerationResult),
    ``"stopped"`` (None: the job ended early at its client's request, :meth:`stop`, after the blocks sent so
    far) or ``"error"`` (a :class:`JobError`); exactly one of the last three ends every job, a cancelled one
    included."""

    ids: list[int]
    emit: Callable[[str, object], None]
    kwargs: dict = field(default_factory=dict)  # Engine.generate keyword arguments (seed, settings, ...)
    images: dict = field(default_factory=dict)  # pixel_values, image_position_ids, mm_token_type_ids
    drafts: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    # worker state
    cache: object = None
    position: int = 0  # prompt tokens encoded so far
    events: object = None
    waiting: DecoderPass | None = None  # the decoder pass this job needs before its next step
    hidden: object = None  # the answer to ``waiting``, sent to ``events`` on the next advance
    block_t0: float = 0.0
    counted: int = 0  # tokens counted as generated (up to the first end-of-sequence id and the budget)
    ended: bool = False  # an end-of-sequence id was counted
    over: bool = False  # its terminal event was emitted (exactly one per job)
    budget: int = 0  # new tokens at most (max_new_tokens, or what max_length leaves; set by submit)

    def cancel(self) -> None:
        """The client has gone: end the job at the next chance, answered with a 499 error."""
        self.cancelled.set()

    def stop(self) -> None:
        """The client has what it needs (a stop string showed): end the job at the next chance, as finished."""
        self.stopping.set()


class Scheduler:
    """Runs :class:`Job` s on ``engine`` in a worker thread (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 1024,
                 prefill_chunk: int = PREFILL_CHUNK):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DgemmaError(f"{name} must be a positive integer, got {value!r:.40}")
        self.engine, self.max_batch, self.max_queue, self.prefill_chunk = engine, max_batch, max_queue, prefill_chunk
        self.pending: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.lock = threading.Condition()
        self.running = False
        self.refusing: str | None = None  # why new jobs are refused (refuse_waiting), if they are
        self.thread: threading.Thread | None = None
        self.stats = {"requests_total": 0, "requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0,
                      "tokens_total": 0, "blocks_total": 0, "block_seconds_total": 0.0, "rounds_total": 0,
                      "decoder_passes_total": 0, "decoder_rows_total": 0, "step_seconds_total": 0.0}

    # -- client side ----------------------------------------------------------------------------

    def start(self) -> None:
        with self.lock:
            if self.running:
                return
            self.running = True
            self.refusing = None
        self.thread = threading.Thread(target=self._loop, name="dgemma-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()

    def refuse_waiting(self, why: str) -> None:
        """End every job still waiting with a 503 ``why`` and refuse new ones (QueueFullError) from now on; the
        running jobs go on (a server stopping: its clients need not wait for every queued generation to run)."""
        with self.lock:
            self.refusing = why
            self._drop_cancelled()  # clients already gone: cancelled (499), not failed
            jobs, self.pending = list(self.pending), collections.deque()
            self.lock.notify_all()
        for job in jobs:  # outside the lock: a client's emit may take its time
            self._end(job, "requests_failed", "error", JobError(why, 503))

    def submit(self, job: Job) -> None:
        """Queue ``job``: a bad job raises DgemmaError, one the scheduler cannot take now QueueFullError."""
        self._check(job)
        with self.lock:
            if not self.running:
                raise QueueFullError("the scheduler is not running")
            if self.refusing is not None:
                raise QueueFullError(self.refusing)
            self._drop_cancelled()
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self.pending.append(job)
            self.stats["requests_total"] += 1
            self.lock.notify_all()

    def snapshot(self) -> dict:
        with self.lock:
            self._drop_cancelled()
            return dict(self.stats, queue_length=len(self.pending), active=len(self.active), max_batch=self.max_batch)

    def _check(self, job: Job) -> None:
        """Refuse, naming the value, a job the worker could not run: its ids, its keywords."""
        ids = job.ids
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DgemmaError(f"job ids must be a non-empty list of token ids, got {ids!r:.60}")
        if not isinstance(job.kwargs, dict) or not callable(job.emit):
            raise DgemmaError("a job needs kwargs (a dict of generate arguments) and emit (a callable)")
        taken = [k for k in _RESERVED_KWARGS if k in job.kwargs]
        if taken:
            raise DgemmaError(f"job kwargs may not set {taken[0]}=: the scheduler sets it")
        # The budget as generate resolves it (checked here: the job's cache is sized by it).
        kw, cfg = job.kwargs, self.engine.config
        settings = self.engine.generation_settings.updated(max_new_tokens=kw.get("max_new_tokens"),
                                                           max_length=kw.get("max_length"))
        budget = kw.get("max_new_tokens")
        if budget is None:
            budget = settings.max_new_tokens if settings.max_length is None else settings.max_length - len(ids)
            if budget <= 0:
                raise DgemmaError(f"max_length {settings.max_length} leaves no room for new tokens after the job's "
                                  f"{len(ids)} prompt tokens")
        c = cfg.canvas_length
        if len(ids) + -(-budget // c) * c > cfg.max_position_embeddings:
            raise DgemmaError(f"max_new_tokens {budget} (rounded up to whole {c}-token canvases) after {len(ids)} "
                              f"prompt tokens exceeds max_position_embeddings {cfg.max_position_embeddings}")
        job.budget = budget

    def _drop_cancelled(self) -> None:
        """End the waiting jobs whose clients have gone (under the lock): they hold no place in the queue."""
        if any(job.cancelled.is_set() for job in self.pending):
            gone = [job for job in self.pending if job.cancelled.is_set()]
            self.pending = collections.deque(job for job in self.pending if not job.cancelled.is_set())
            for job in gone:
                self._end(job, "requests_cancelled", "error", JobError("cancelled", 499))

    # -- worker ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.pending and not self.active:
                    self.lock.wait()
                if not self.running:
                    jobs = list(self.pending) + self.active
                    self.pending.clear()
                    self.active.clear()
                    break
                self._drop_cancelled()
                while self.pending and len(self.active) < self.max_batch:
                    self.active.append(self.pending.popleft())
                round_jobs = list(self.active)
                self.stats["rounds_total"] += 1
            ready = []
            for job in round_jobs:
                if self._quantum(job):
                    with self.lock:
                        self.active.remove(job)
                elif job.waiting is not None:
                    ready.append(job)
            if ready:
                self._decode(ready)
        for job in jobs:
            try:
                if job.events is not None:
                    job.events.close()
            except Exception:  # noqa: BLE001 - shutting down: every job still gets its answer
                log.exception("dgemma scheduler: closing a job's generation failed at shutdown")
            self._end(job, "requests_failed", "error", JobError("the server is shutting down", 503))

    def _decode(self, jobs: list[Job]) -> None:
        """One decoder pass for the waiting steps of ``jobs``, batched; a job whose pass fails gets its error
        when it next advances (the batch is retried one job at a time to find it)."""
        model = self.engine.model
        passes = [job.waiting for job in jobs]
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                # The canvases come from the jobs' own samplers: no ids to range-check (a device sync).
                h = model.denoise_hidden_rows(torch.cat([p.canvas for p in passes]), [p.cache for p in passes],
                                              [p.soft for p in passes], check_ids=False)
            hidden = list(h.split(1))
        except Exception:  # noqa: BLE001 - isolate the failing request; the others go on
            hidden = []
            for p in passes:
                try:
                    with torch.inference_mode():
                        hidden.append(model.denoise_hidden(p.canvas, p.cache, p.soft))
                except Exception as e:  # noqa: BLE001 - delivered to that job's generator
                    hidden.append(e)
        with self.lock:
            self.stats["decoder_passes_total"] += 1
            self.stats["decoder_rows_total"] += len(jobs)
            self.stats["step_seconds_total"] += time.perf_counter() - t0
        for job, out in zip(jobs, hidden):
            job.waiting, job.hidden = None, out

    def _quantum(self, job: Job) -> bool:
        """One prefill chunk of ``job``, or its generation advanced to its next decoder pass (emitting the
        drafts and blocks on the way); True when the job has ended."""
        if job.cancelled.is_set() or job.stopping.is_set():
            self._cancel(job)
            return True
        try:
            with torch.inference_mode():
                if job.events is None:
                    self._prefill_or_start(job)
                    if job.events is None:
                        return False
                    job.block_t0 = time.perf_counter()
                while True:
                    sent, job.hidden = job.hidden, None
                    if isinstance(sent, BaseException):
                        item = job.events.throw(sent)
                    else:
                        item = job.events.send(sent)
                    if isinstance(item, DecoderPass):
                        job.waiting = item
                        return False
                    if isinstance(item, GenerationResult):
                        self._end(job, "requests_finished", "done", item)
                        return True
                    if item.kind == "draft":
                        if job.drafts:
                            self._emit(job, "draft", item)
                    else:
                        with self.lock:
                            self.stats["blocks_total"] += 1
                            self.stats["block_seconds_total"] += time.perf_counter() - job.block_t0
                            self.stats["tokens_total"] += self._count(job, item.tokens[0].tolist())
                        job.block_t0 = time.perf_counter()
                        self._emit(job, "block", item)
                    if job.cancelled.is_set() or job.stopping.is_set():
                        self._cancel(job)
                        return True
        except StopIteration:
            self._end(job, "requests_failed", "error",
                      JobError("internal error: the generation ended without a result", 500))
            return True
        except NonFiniteError as e:  # the weights' doing, not the request's
            self._end(job, "requests_failed", "error", JobError(str(e), 500))
            return True
        except OutOfMemoryError as e:  # a valid request the device cannot hold now
            self._end(job, "requests_failed", "error", JobError(str(e), 503))
            return True
        except DgemmaError as e:
            self._end(job, "requests_failed", "error", JobError(str(e), 400))
            return True
        except Exception as e:  # noqa: BLE001  NOTE: a failing request must never take the worker down
            self._end(job, "requests_failed", "error", JobError(f"internal error: {type(e).__name__}: {e}", 500))
            return True

    def _count(self, job: Job, tokens: list[int]) -> int:
        """How many of a block's ``tokens`` count as generated: those up to the job's first end-of-sequence id
        (included) and within its budget (the blocks round it up to whole canvases)."""
        eng = self.engine
        ends = eng.end_ids(job.kwargs.get("eos_token_id"))
        budget = job.budget
        before = job.counted
        for t in tokens:
            if job.ended or job.counted >= budget:
                break
            job.counted += 1
            job.ended = t in ends
        return job.counted - before

    def _cancel(self, job: Job) -> None:
        """End a cancelled or stopped job; closing its generator rolls its cache back and frees it at once. The job
        ends even where the rollback fails (a broken device): the worker must not die with it."""
        try:
            if job.events is not None:
                job.events.close()
        except Exception as e:  # noqa: BLE001
            self._end(job, "requests_failed", "error",
                      JobError(f"internal error while cancelling: {type(e).__name__}: {e}", 500))
            return
        if job.cancelled.is_set():
            self._end(job, "requests_cancelled", "error", JobError("cancelled", 499))
        else:
            self._end(job, "requests_finished", "stopped", None)

    def _prefill_or_start(self, job: Job) -> None:
        """Encode the prompt in chunks (all but its last chunk), then start the generation on the rest.
        Prompts with images are encoded whole (an image's tokens go through the encoder together)."""
        eng = self.engine
        ids = job.ids
        if job.cache is None:
            blocks = -(-job.budget // eng.config.canvas_length)
            job.cache = eng.new_cache(1, len(ids) + blocks * eng.config.canvas_length)
        rest = len(ids) - job.position
        if not job.images and rest > self.prefill_chunk:
            chunk = ids[job.position:job.position + self.prefill_chunk]
            Engine.encode(eng, [chunk], cache=job.cache)
            job.position += len(chunk)
            return
        kwargs = dict(job.kwargs, max_new_tokens=job.budget)  # the budget submit resolved
        kwargs.pop("max_length", None)
        if "seed" not in kwargs or kwargs["seed"] is None:
            kwargs["seed"] = int.from_bytes(os.urandom(6), "little")
        job.events = Engine.generate_stream(eng, [ids[job.position:]], cache=job.cache, **job.images,
                                            external_decoder=True, **kwargs)

    def _end(self, job: Job, counter: str, kind: str, payload) -> None:
        """Emit ``job``'s terminal event, once: a job that has ended ends no more. A client's ``emit`` that raises
        (e.g. a server whose event loop has closed) is logged; the worker goes on."""
        with self.lock:
            if job.over:
                return
            job.over = True
            self.stats[counter] += 1
        job.events, job.cache, job.waiting, job.hidden = None, None, None, None
        self._emit(job, kind, payload)

    @staticmethod
    def _emit(job: Job, kind: str, payload) -> None:
        try:
            job.emit(kind, payload)
        except Exception:  # noqa: BLE001 - a client's callback must never take the worker down
            log.exception("dgemma scheduler: a job's emit(%r) raised; the job goes on without that event", kind)
