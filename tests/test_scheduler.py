"""The server's scheduler on its own: the denoising steps of concurrent requests run as one batched decoder
pass (model.denoise_hidden_rows), and every request still gets exactly the tokens it gets alone."""

import threading

import pytest
import torch
from serve_fixture import pace_decoder

from dgemma.engine import Engine
from dgemma.random_checkpoint import random_engine
from dgemma.scheduler import Job, Scheduler


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=7, canvas_length=16)


class Collect:
    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, kind, payload):
        self.items.append((kind, payload))
        if kind in ("done", "error"):
            self.done.set()

    @property
    def result(self):
        kind, payload = self.items[-1]
        assert kind == "done", payload
        return payload


def run_jobs(engine, specs, *, max_batch=8, prefill_chunk=512, before_start=None):
    sched = Scheduler(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    jobs = [Job(ids=ids, emit=Collect(), kwargs=kw, drafts=True) for ids, kw in specs]
    if before_start is not None:
        before_start(sched, jobs)
    sched.start()
    try:
        for job in jobs:
            sched.submit(job)
        for job in jobs:
            assert job.emit.done.wait(120)
    finally:
        sched.stop()
    return sched, jobs


def alone(engine, ids, kw, chunk=512, stream=None):
    """The request run by itself as the scheduler runs it: the prompt encoded in the same chunks (chunked and
    whole encodes round differently), then generate on the rest."""
    blocks = -(-kw["max_new_tokens"] // engine.config.canvas_length)
    cache = engine.new_cache(1, len(ids) + blocks * engine.config.canvas_length)
    pos = 0
    while len(ids) - pos > chunk:
        Engine.encode(engine, [ids[pos:pos + chunk]], cache=cache)
        pos += chunk
    return Engine.generate(engine, [ids[pos:]], cache=cache, stream=stream, **kw)


def prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SPECS = [
    (prompt(9, 1), dict(seed=11, max_new_tokens=32, max_denoising_steps=3, eos_token_id=[])),
    (prompt(40, 2), dict(seed=12, max_new_tokens=48, max_denoising_steps=5, entropy_bound=0.5, eos_token_id=[])),
    (prompt(23, 3), dict(seed=13, max_new_tokens=16, max_denoising_steps=4, t_max=1.0, eos_token_id=[])),
    (prompt(70, 4), dict(seed=14, max_new_tokens=32, max_denoising_steps=2, eos_token_id=[1, 2], pad_token_id=0)),
]


def test_batched_steps_give_every_request_its_tokens_alone(engine):
    """Different prompt lengths (one prefilled in chunks), budgets, step counts and sampler settings in one
    batch: token-identical to Engine.generate of each request alone, drafts included."""
    sched, jobs = run_jobs(engine, SPECS, prefill_chunk=32)
    for (ids, kw), job in zip(SPECS, jobs):
        drafts = []
        ref = alone(engine, ids, kw, 32, stream=lambda e: drafts.append(e) if e.kind == "draft" else None)
        assert torch.equal(job.emit.result.new_tokens, ref.new_tokens)
        got = [p for k, p in job.emit.items if k == "draft"]
        assert len(got) == len(drafts)
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, drafts))
    s = sched.snapshot()
    # 29 steps in all (6 + 15 + 4 + 4), the longest request 15: the passes carried several canvases at once.
    assert s["decoder_rows_total"] == 29 and s["decoder_passes_total"] <= 17, s
    assert s["requests_finished"] == 4 and s["active"] == 0


def test_the_batch_never_exceeds_max_batch_and_queued_requests_join_later(engine):
    sched, jobs = run_jobs(engine, SPECS * 2, max_batch=3)
    s = sched.snapshot()
    assert s["requests_finished"] == 8
    assert s["decoder_rows_total"] <= 3 * s["decoder_passes_total"]
    for (ids, kw), job in zip(SPECS * 2, jobs):
        assert torch.equal(job.emit.result.new_tokens, alone(engine, ids, kw).new_tokens)


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(engine):
    def cancel_on_first_draft(sched, jobs):
        victim = jobs[1]
        emit = victim.emit

        def cancelling(kind, payload):
            emit(kind, payload)
            if kind == "draft":
                victim.cancel()
        victim.emit = cancelling
        victim.emit.done = emit.done
        victim.emit.items = emit.items

    sched, jobs = run_jobs(engine, SPECS, before_start=cancel_on_first_draft)
    assert jobs[1].emit.items[-1] == ("error", "cancelled")
    assert jobs[1].cache is None and jobs[1].events is None  # its generator closed, its cache freed
    for i in (0, 2, 3):
        ids, kw = SPECS[i]
        assert torch.equal(jobs[i].emit.result.new_tokens, alone(engine, ids, kw).new_tokens)
    s = sched.snapshot()
    assert s["requests_cancelled"] == 1 and s["requests_finished"] == 3


def test_a_failing_decoder_pass_fails_only_its_request(engine, monkeypatch):
    """The batched pass raises; the scheduler retries the rows one by one and only the bad one fails."""
    model = engine.model
    bad_cache = {}
    real_alone = model.denoise_hidden

    def rows(canvas, caches, softs, **kwargs):
        raise RuntimeError("batched pass failed")

    def one_row(canvas, cache, soft=None, prefix=None):
        if cache is bad_cache.get("cache"):
            raise RuntimeError("this request's pass failed")
        return real_alone(canvas, cache, soft, prefix)

    monkeypatch.setattr(model, "denoise_hidden_rows", rows)
    monkeypatch.setattr(model, "denoise_hidden", one_row)

    def mark(sched, jobs):
        original = sched._prefill_or_start

        def start(job):
            original(job)
            if job is jobs[2] and job.cache is not None:
                bad_cache["cache"] = job.cache
        sched._prefill_or_start = start

    sched, jobs = run_jobs(engine, SPECS, before_start=mark)
    kind, message = jobs[2].emit.items[-1]
    assert kind == "error" and "this request's pass failed" in message
    for i in (0, 1, 3):
        assert jobs[i].emit.items[-1][0] == "done"
    monkeypatch.undo()
    for i in (0, 1, 3):
        ids, kw = SPECS[i]
        assert torch.equal(jobs[i].emit.result.new_tokens, alone(engine, ids, kw).new_tokens)


def test_external_decoder_protocol_through_generate_stream(engine):
    """generate_stream(external_decoder=True) yields a DecoderPass per step and takes the hidden states back;
    answering each with the plain decoder gives generate's tokens; a wrong answer is refused by name."""
    from dgemma.errors import DgemmaError
    from dgemma.generation import DecoderPass, GenerationResult

    ids, kw = SPECS[1]
    events = Engine.generate_stream(engine, [ids], external_decoder=True, **kw)
    sent, passes = None, 0
    while True:
        item = events.send(sent)
        sent = None
        if isinstance(item, DecoderPass):
            passes += 1
            sent = engine.model.denoise_hidden(item.canvas, item.cache, item.soft)
        elif isinstance(item, GenerationResult):
            break
    assert passes == sum(sum(b) for b in item.steps_per_block)
    assert torch.equal(item.sequences, Engine.generate(engine, [ids], **kw).sequences)
    # Wrong answers to a DecoderPass: refused by name before the head runs (shape, hidden size, dtype, type).
    for wrong in (lambda h: torch.zeros(3), lambda h: h[..., :7], lambda h: h.double(), lambda h: h[0],
                  lambda h: None, lambda h: "h"):
        events = Engine.generate_stream(engine, [ids], external_decoder=True, **kw)
        first = next(events)
        assert first.kind == "decoder_pass"
        h = engine.model.denoise_hidden(first.canvas, first.cache, first.soft)
        with pytest.raises(DgemmaError, match="a DecoderPass must be answered with the hidden states of its canvas"):
            events.send(wrong(h))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype,quantization", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float32, "fp8")])
def test_denoise_hidden_rows_equals_each_row_alone(dtype, quantization, batched, monkeypatch):
    """Rows with different cache lengths (rings wrapped or not, one left-padded), with and without a
    self-conditioning input: bit-identical to each row's own decoder pass. ``batched``: the one-pass path (what
    batch-invariant ops take; the tiny model's matmuls, all under 256 wide, round alike at any row count here)."""
    eng = random_engine("tiny", seed=3, canvas_length=16, dtype=dtype, quantization=quantization)
    if batched:
        monkeypatch.setattr(eng.model.ops, "rows_batch_invariant", lambda weights: True)
    else:
        assert not eng.model.ops.rows_batch_invariant(eng.model.w)
    g = torch.Generator().manual_seed(0)
    caches = []
    for t, pad in ((5, 0), (70, 0), (33, 4)):
        cache = eng.new_cache(1, 120)
        mask = torch.ones(1, t, dtype=torch.bool)
        mask[0, :pad] = False
        eng.encode(torch.randint(3, 512, (1, t), generator=g), cache=cache, attention_mask=mask)
        caches.append(cache)
    canvas = torch.randint(0, 512, (3, 16), generator=g)
    softs = [torch.randn(1, 16, 64, generator=g).to(dtype), None, torch.randn(1, 16, 64, generator=g).to(dtype)]
    rows = eng.model.denoise_hidden_rows(canvas, caches, softs)
    for r in range(3):
        assert torch.equal(rows[r:r + 1], eng.model.denoise_hidden(canvas[r:r + 1], caches[r], softs[r])), r


def test_denoise_hidden_rows_checks_its_arguments(engine):
    from dgemma.errors import DgemmaError

    cache = engine.new_cache(2, 40)
    with pytest.raises(DgemmaError, match=r"one batch-1 cache and one soft input per row .*; got 2 rows, 1 caches"):
        engine.model.denoise_hidden_rows(torch.zeros(2, 16, dtype=torch.long), [cache], [None, None])
    with pytest.raises(DgemmaError, match=r"caches\[0\] must be a batch-1 KVCache"):
        engine.model.denoise_hidden_rows(torch.zeros(1, 16, dtype=torch.long), [cache], [None])


class Raising(Collect):
    """A client whose emit raises on some kinds of event (e.g. a server whose event loop has closed)."""

    def __init__(self, kinds):
        super().__init__()
        self.kinds = kinds

    def __call__(self, kind, payload):
        super().__call__(kind, payload)
        if kind in self.kinds:
            raise RuntimeError(f"client emit failed on {kind}")


@pytest.mark.parametrize("kinds", [("done",), ("block", "error"), ("block", "done", "error")])
def test_an_emit_that_raises_neither_kills_the_worker_nor_doubles_a_terminal_event(engine, kinds):
    sched = Scheduler(engine, max_batch=2)
    sched.start()
    try:
        bad = Job(ids=[2, 10, 11], emit=Raising(kinds), kwargs={"max_new_tokens": 32, "max_denoising_steps": 2,
                                                                "seed": 1})
        good = Job(ids=[2, 12], emit=Collect(), kwargs={"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 2})
        sched.submit(bad)
        sched.submit(good)
        assert bad.emit.done.wait(120) and good.emit.done.wait(120)
        later = Job(ids=[2, 13], emit=Collect(), kwargs={"max_new_tokens": 16, "max_denoising_steps": 2, "seed": 3})
        sched.submit(later)
        assert later.emit.done.wait(120) and later.emit.items[-1][0] == "done"  # the worker is alive
    finally:
        sched.stop()
    for job in (bad, good):
        terminal = [k for k, _ in job.emit.items if k in ("done", "error", "stopped")]
        assert len(terminal) == 1, job.emit.items
    s = sched.snapshot()
    assert s["requests_finished"] + s["requests_failed"] + s["requests_cancelled"] == s["requests_total"] == 3


def test_stopping_the_scheduler_answers_every_job_once_even_if_an_emit_raises(engine, monkeypatch):
    pace_decoder(monkeypatch, engine, 0.05)
    sched = Scheduler(engine, max_batch=1)
    sched.start()
    jobs = [Job(ids=[2, 10 + i], emit=Raising(("error",)) if i == 0 else Collect(),
                kwargs={"max_new_tokens": 64, "max_denoising_steps": 4, "seed": i}) for i in range(3)]
    for job in jobs:
        sched.submit(job)
    sched.stop()
    for job in jobs:
        assert [k for k, _ in job.emit.items if k in ("done", "error")] in (["done"], ["error"]), job.emit.items
    s = sched.snapshot()
    assert s["requests_finished"] + s["requests_failed"] + s["requests_cancelled"] == s["requests_total"] == 3


@pytest.mark.parametrize("job,message", [
    (dict(ids=None), r"job ids must be a non-empty list of token ids, got None"),
    (dict(ids=[]), r"job ids must be a non-empty list"),
    (dict(ids=[2, "x"]), r"job ids must be a non-empty list"),
    (dict(kwargs={"max_new_tokens": "32"}), r"max_new_tokens must be a positive integer, got '32'"),
    (dict(kwargs={"max_new_tokens": 2.5}), r"max_new_tokens must be a positive integer, got 2.5"),
    (dict(kwargs={"cache": None}), r"job kwargs may not set cache=: the scheduler sets it"),
    (dict(kwargs={"external_decoder": True}), r"may not set external_decoder="),
])
def test_a_bad_job_is_refused_at_submit_naming_the_value(engine, job, message):
    from dgemma.errors import DgemmaError

    sched = Scheduler(engine)
    sched.start()
    try:
        spec = dict(ids=[2, 10], emit=Collect(), kwargs={"max_new_tokens": 16})
        spec.update(job)
        with pytest.raises(DgemmaError, match=message):
            sched.submit(Job(**spec))
    finally:
        sched.stop()


@pytest.mark.parametrize("kw", [dict(max_batch="8"), dict(max_batch=None), dict(prefill_chunk=1.5),
                                dict(max_queue=0)])
def test_scheduler_settings_are_positive_integers(engine, kw):
    from dgemma.errors import DgemmaError

    with pytest.raises(DgemmaError, match="must be a positive integer"):
        Scheduler(engine, **kw)


def test_the_reference_ops_run_each_rows_pass_on_its_own(engine, monkeypatch):
    """A CPU or cuBLAS matmul's rounding may depend on its row count (and on its operands' alignment), and the
    sampler turns a last-bit difference into other tokens: with the reference ops a batched decoder pass runs each
    row's own pass (batched requests differed from their tokens alone on a model with 512-wide matmuls)."""
    model = engine.model
    assert not model.ops.rows_batch_invariant(model.w)
    calls = []
    one = model.denoise_hidden

    def spy(canvas, cache, soft=None, *args):
        calls.append(canvas.shape[0])
        return one(canvas, cache, soft, *args)

    monkeypatch.setattr(model, "denoise_hidden", spy)
    caches = [engine.encode(torch.tensor([prompt(n, n)])) for n in (3, 9, 20)]
    canvas = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    rows = model.denoise_hidden_rows(canvas, caches, [None] * 3)
    assert calls == [1, 1, 1] and rows.shape == (3, 16, engine.config.hidden_size)


def test_a_job_without_max_new_tokens_gets_the_budget_generate_would(engine, monkeypatch):
    """No max_new_tokens: the engine's default, or what generation_config.json's max_length leaves after the
    prompt (its cache is sized by it and the job gets the tokens generate gives); a budget past the positions is
    refused naming max_new_tokens."""
    import dataclasses

    from dgemma.errors import DgemmaError

    ids = prompt(9, 5)
    kw = dict(seed=3, max_denoising_steps=2, eos_token_id=[])
    monkeypatch.setattr(engine, "generation_settings", dataclasses.replace(engine.generation_settings, max_length=70))
    sched, jobs = run_jobs(engine, [(ids, dict(kw)), (ids, dict(kw, max_length=30))])
    assert jobs[0].emit.result.new_tokens.shape[1] == 64 and jobs[1].emit.result.new_tokens.shape[1] == 32
    assert torch.equal(jobs[0].emit.result.new_tokens, Engine.generate(engine, [ids], **kw).new_tokens)
    assert sched.snapshot()["tokens_total"] == 61 + 21  # up to each budget (70 - 9, 30 - 9)
    sched = Scheduler(engine)
    sched.start()
    try:
        with pytest.raises(DgemmaError, match=r"max_new_tokens 100000000 \(rounded up to whole 16-token canvases\) "
                                              r"after 9 prompt tokens exceeds max_position_embeddings"):
            sched.submit(Job(ids=ids, emit=Collect(), kwargs=dict(kw, max_new_tokens=10**8)))
        with pytest.raises(DgemmaError, match=r"max_length 5 leaves no room for new tokens after the job's 9"):
            sched.submit(Job(ids=ids, emit=Collect(), kwargs=dict(kw, max_length=5)))
    finally:
        sched.stop()
