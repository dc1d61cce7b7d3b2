"""`dgemma` commands given bad input: one `dgemma: error:` line naming the bad value and a non-zero exit, found
before anything slow runs (weights loaded, random weights made); a chat goes on after a bad turn."""

import io
import os
import socket
import subprocess
import sys

import pytest
from chat_fixture import write_chat_checkpoint

from dgemma.cli import main
from dgemma.demo import write_demo_checkpoint

GEN = ["--max-new-tokens", "8", "--steps", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return str(write_demo_checkpoint(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """A chat checkpoint whose tokenizer has no vision tokens (images cannot be sent to it)."""
    return str(write_chat_checkpoint(tmp_path_factory.mktemp("chat"), seed=1))


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dgemma: error:")]


def _chat(monkeypatch, capsys, model, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    rc = main(["chat", "--model", model, *GEN])
    out, err = capsys.readouterr()
    return rc, out, err


def test_chat_refuses_an_image_that_does_not_load_when_attached(demo, monkeypatch, capsys):
    """A file that is no image is refused at /image, so the messages after it are answered."""
    config = os.path.join(demo, "config.json")
    rc, out, err = _chat(monkeypatch, capsys, demo, ["hi", f"/image {config}", "hello", "again"])
    assert rc == 1  # a turn failed, with stdin not a terminal
    assert len(err.strip().splitlines()) == 1, err
    [line] = _errors(err)
    assert f"/image {config}" in line and "cannot decode image" in line
    assert out.count("> ") >= 3  # every message was read and answered


def test_chat_drops_the_attachments_of_a_failed_turn(text_only, tmp_path, monkeypatch, capsys):
    """An image that loads but cannot be sent (no vision tokens): that turn fails, the next ones work."""
    from PIL import Image

    png = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(png)
    rc, out, err = _chat(monkeypatch, capsys, text_only, [f"/image {png}", "what is this?", "hello", "again"])
    assert rc == 1
    errors = _errors(err)
    assert len(errors) == 1 and "dropped the 1 attachment(s)" in errors[0], err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("fd,args,needle", [
    (0, ["chat"], "stdin is closed"),
    (1, ["generate", "--prompt", "hi"], "stdout is closed"),
    (1, ["chat"], "stdout is closed"),
])
def test_a_closed_standard_stream_is_one_line(demo, fd, args, needle):
    if fd == 1:
        r = subprocess.run([sys.executable, "-m", "dgemma", *args, "--model", demo, *GEN], stderr=subprocess.PIPE,
                           text=True, timeout=300, preexec_fn=lambda: os.close(1))
    else:
        r = subprocess.run([sys.executable, "-m", "dgemma", *args, "--model", demo, *GEN], capture_output=True,
                           text=True, timeout=300, preexec_fn=lambda: os.close(0))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("dgemma: error: ") and needle in line


def test_a_closed_stderr_does_not_send_the_summary_to_stdout(demo):
    r = subprocess.run([sys.executable, "-m", "dgemma", "generate", "--model", demo, "--prompt", "hi", *GEN],
                       stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert r.returncode == 0
    assert "denoising steps" not in r.stdout and r.stdout.strip()


def _forbid(monkeypatch, module, name: str, what: str) -> None:
    """``module.name`` fails the test if called (``what`` happened): a check must come before it."""
    def called(*args, **kwargs):
        raise AssertionError(what)

    monkeypatch.setattr(module, name, called)


@pytest.fixture
def no_bench_run(monkeypatch):
    """bench.run fails the test if called: the checks must come before any weights are made."""
    import dgemma.bench

    _forbid(monkeypatch, dgemma.bench, "run", "bench.run was called")


def test_bench_refuses_a_batch_that_cannot_fit(no_bench_run, monkeypatch, capsys):
    import dgemma.cache

    monkeypatch.setattr(dgemma.cache, "available_bytes", lambda device: 8 * 2**30)
    assert main(["bench", "--batch", "1,100000", "--device", "cpu", "--iters", "1", "--warmup", "1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dgemma: error: --batch 100000: ") and "does not fit" in line and "8.00 GiB free" in line


@pytest.mark.parametrize("args, needle", [
    (["--plot", "{d}/x.txt"], "--plot {d}/x.txt: 'txt' is not an image type matplotlib writes; expected a file "
                              "ending in one of"),
    (["--plot", "{d}/noext"], "--plot {d}/noext: no file type is not an image type"),
    (["--json", ""], "--json '': an empty path"),
    (["--plot", ""], "--plot '': an empty path"),
    (["--json", "{d}/r.png", "--plot", "{d}/r.png"], "--json and --plot name the same file {d}/r.png"),
])
def test_bench_output_files_are_checked_before_the_run(no_bench_run, capsys, tmp_path, args, needle):
    args = [a.format(d=tmp_path) for a in args]
    assert main(["bench", "--device", "cpu", "--iters", "1", "--warmup", "1", *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dgemma: error: " + needle.format(d=tmp_path)), line


@pytest.mark.parametrize("option", ["--prefill-lengths", "--prefix-lengths", "--prompt-length"])
def test_bench_lengths_past_the_positions_are_refused_alike(no_bench_run, capsys, option):
    assert main(["bench", option, "100000000", "--device", "cpu", "--iters", "1", "--warmup", "1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dgemma: error: {option} 100000000: ") and "expected at most 7936" in line


@pytest.fixture
def no_load(monkeypatch):
    import dgemma.loading

    _forbid(monkeypatch, dgemma.loading, "load", "the weights were loaded")


def test_serve_on_a_port_in_use_fails_before_loading(demo, no_load, capsys):
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", demo, "--port", str(port)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"dgemma: error: cannot listen on 127.0.0.1:{port}: port {port} is already in use"


@pytest.mark.parametrize("host", ["999.999.1.1", "not a host!"])
def test_serve_on_a_bad_host_fails_before_loading(demo, no_load, capsys, host):
    pytest.importorskip("uvicorn")
    assert main(["serve", "--model", demo, "--host", host, "--port", "18123"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dgemma: error: host {host!r} is not an address to listen on")


def test_demo_save_under_a_file_is_refused_naming_the_option(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--save", str(tmp_path / "afile" / "sub")]) == 2
    [line] = _errors(capsys.readouterr().err)
    assert line == f"dgemma: error: --save {tmp_path}/afile/sub: {tmp_path}/afile is not a directory"


def test_chat_sizes_its_session_for_the_answers_it_asks_for(demo, monkeypatch, capsys):
    """dgemma chat's session keeps room to roll back one answer of --max-new-tokens, so a turn encodes only what
    is new (a session sized for the checkpoint's smaller default re-encoded the whole conversation)."""
    from dgemma.session import ChatSession

    sessions = []
    init = ChatSession.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(ChatSession, "__init__", spy)
    # Answers of 96 tokens, more than the checkpoint's default of 64 (generation_config.json).
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nhello\nand more?\n"))
    rc = main(["chat", "--model", demo, "--max-new-tokens", "96", "--steps", "1", "--seed", "0"])
    assert rc == 0, capsys.readouterr().err
    assert [s.max_new_tokens for s in sessions] == [96, 96]
    assert sessions[-1].cache.rollback >= 96  # room to roll back one whole answer


@pytest.mark.parametrize("args, needle", [
    (["bench", "--steps", "2,1025"], "argument --steps: expected at most 1024 denoising steps, got 1025"),
    (["bench", "--steps", "2,2"], "argument --steps: '2,2' lists 2 twice; expected each value once"),
    (["bench", "--batch", "\u0661"], "argument --batch: expected comma-separated positive integers"),
    (["bench", "--cuda-graphs", "on"], "--cuda-graphs on: CUDA graphs need a CUDA device, not cpu"),
    (["bench", "--plot", "{d}/x.pgf"], "'pgf' is not an image type matplotlib writes"),
    (["demo", "--save", "{d}/ck", "--steps", "5000"], "argument --steps: expected at most 1024 denoising steps"),
    (["demo", "--save", ""], "--save '': expected a directory path"),
])
def test_options_are_refused_before_any_work(no_bench_run, tmp_path, capsys, args, needle):
    args = [a.replace("{d}", str(tmp_path)) for a in args]
    if args[0] == "bench":
        args += ["--device", "cpu", "--iters", "1", "--warmup", "0"]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors (the option's type)
        rc = e.code
    assert rc == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert needle in line, line
    assert not os.path.exists(tmp_path / "ck")  # demo wrote nothing


@pytest.mark.parametrize("args, needle", [
    (["--host", ""], "host '' is empty; expected an IP address"),
    (["--served-model-name", ""], "--served-model-name '': expected the model id"),
])
def test_serve_refuses_an_empty_host_or_model_name_before_loading(demo, no_load, capsys, args, needle):
    assert main(["serve", "--model", demo, "--port", "8765", *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert needle in line, line


def test_bench_json_command_replays_and_plot_has_no_warning(tmp_path, capsys, monkeypatch):
    import json
    import shlex
    import warnings

    out = tmp_path / "a b.json"
    args = ["bench", "--device", "cpu", "--iters", "1", "--warmup", "0", "--steps", "1", "--prompt-length", "8",
            "--batch", "2", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    monkeypatch.setattr(sys, "argv", ["dgemma", *args])  # what the JSON records as the command
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "no artists with labels" warning included
        assert main(args) == 0
    report = json.loads(out.read_text())
    assert shlex.split(report["command"])[shlex.split(report["command"]).index("--json") + 1] == str(out)
    assert (tmp_path / "p.png").stat().st_size > 1000
