"""A live `dgemma serve` app for tests: uvicorn in a thread on 127.0.0.1, on a free port; the module fixtures
``engine`` (the tiny chat checkpoint, canvas 16) and ``server`` ((OpenAIServer, base URL)) that import them."""

import contextlib
import socket
import threading
import time

import pytest
import torch

MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(srv, **options):
    """``srv`` (an OpenAIServer) served over HTTP while the block runs, by the server ``dgemma serve`` runs
    (dgemma.server.web_server; ``options`` go to it); yields its base URL."""
    from dgemma.server import web_server

    port = free_port()
    web = web_server(srv, host="127.0.0.1", port=port, log_level="warning", **options)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import dgemma
    from chat_fixture import write_chat_checkpoint

    path = write_chat_checkpoint(tmp_path_factory.mktemp("serve"), seed=3)
    return dgemma.load(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def server(engine):
    from dgemma.server import OpenAIServer

    srv = OpenAIServer(engine, model_name=MODEL, max_batch=8, max_context=512)
    with serving(srv) as base:
        yield srv, base


def pace_decoder(monkeypatch, engine, seconds: float) -> None:
    """Every batched decoder pass of ``engine`` takes at least ``seconds`` (to hang up while a job runs)."""
    model = engine.model
    rows = model.denoise_hidden_rows

    def paced(*args, **kwargs):
        time.sleep(seconds)
        return rows(*args, **kwargs)

    monkeypatch.setattr(model, "denoise_hidden_rows", paced)


def hang_up_when(srv, base: str, path: str, body: dict, ready, what: str, linger: float = 0.0) -> None:
    """POST ``body`` on a raw socket and close it (the client hangs up) ``linger`` seconds after
    ``ready(snapshot)`` holds."""
    import json

    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % (path.encode(), len(raw)) + raw)
        deadline = time.time() + 30
        while not ready(srv.scheduler.snapshot()):
            assert time.time() < deadline, what
            time.sleep(0.01)
        time.sleep(linger)
