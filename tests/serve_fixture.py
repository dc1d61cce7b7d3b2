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
def serving(srv):
    """``srv`` (an OpenAIServer) served over HTTP while the block runs; yields its base URL."""
    import uvicorn

    from dgemma.server import create_app

    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(srv), host="127.0.0.1", port=port, log_level="warning"))
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
