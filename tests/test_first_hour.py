"""What a new user meets first: the demo checkpoint, the CLI's rough edges, the README's examples,
the version and the packaging."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dgemma
from dgemma.cli import main, print_bench_table
from dgemma.demo import CONTROL_TOKENS, VISION_TOKENS
from dgemma.random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUTF8="1")


def dgemma_cli(*args, input=None, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "dgemma", *args], capture_output=True, input=input,
                          env=env or ENV, timeout=300, **kw)


def one_error_line(stderr: bytes | str) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("first_hour") / "demo-ckpt"
    r = dgemma_cli("demo", "--save", str(path))
    assert r.returncode == 0, r.stderr
    assert f"dgemma chat --model {path}" in r.stdout.decode()
    return path


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("first_hour") / "bare", "tiny", canvas_length=16)


# --- --help without torch -------------------------------------------------------------------------------

HELP_PROBE = textwrap.dedent("""
    import sys
    from dgemma.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        assert e.code == 0, e.code
    heavy = sorted(m for m in ("torch", "numpy", "dgemma._C", "safetensors", "tokenizers") if m in sys.modules)
    print("IMPORTED", heavy, file=sys.stderr)
""")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["generate", "--help"], ["chat", "--help"],
                                  ["demo", "--help"], ["bench", "--help"]])
def test_help_answers_without_importing_torch(args):
    r = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stderr, r.stderr
    assert r.stdout.strip()


def test_usage_error_answers_without_importing_torch():
    probe = HELP_PROBE.replace("assert e.code == 0, e.code", "assert e.code == 2, e.code")
    r = subprocess.run([sys.executable, "-c", probe, "generate", "--model", "x", "--prompt", "hi", "--seed",
                        str(2**70)], capture_output=True, text=True, env=ENV, timeout=60)
    assert "IMPORTED []" in r.stderr and "seed" in r.stderr and "out of range" in r.stderr, r.stderr


def test_import_dgemma_is_lazy_and_public_names_resolve():
    code = ("import sys, dgemma; assert 'torch' not in sys.modules; "
            "assert dgemma.load.__module__ == 'dgemma.loading'; assert dgemma.DgemmaError.__name__ == 'DgemmaError'; "
            "assert dgemma.generation.StreamEvent and dgemma.TextEngine and dgemma.KVCache; "
            "assert set(dgemma.__all__) <= set(dir(dgemma)); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    with pytest.raises(AttributeError):
        dgemma.no_such_thing


# --- the demo checkpoint --------------------------------------------------------------------------------

def test_demo_save_writes_a_complete_checkpoint(demo_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (demo_dir / name).is_file(), name
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    for i, t in enumerate(CONTROL_TOKENS + VISION_TOKENS):
        assert tok.token_to_id(t) == i, t
    assert CONTROL_TOKENS[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"] and "<|turn>" in CONTROL_TOKENS
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == tok.get_vocab_size() and config["dgemma_version"] == dgemma.__version__
    gen = json.loads((demo_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, CONTROL_TOKENS.index("<turn|>")] and gen["pad_token_id"] == 0
    # A second --save into the same directory rewrites it; a directory with other files is refused.
    assert dgemma_cli("demo", "--save", str(demo_dir), "--steps", "2").returncode == 0
    other = demo_dir.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = dgemma_cli("demo", "--save", str(other))
    assert r.returncode != 0 and "not empty" in one_error_line(r.stderr)
    assert sorted(os.listdir(other)) == ["notes.txt"]


def test_demo_checkpoint_renders_gemma4_turns(demo_dir):
    eng = dgemma.load(demo_dir)
    text = eng.chat_template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                    add_generation_prompt=True, thinking=True)
    assert text == "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_generate_and_chat_on_the_demo_checkpoint(demo_dir):
    r = dgemma_cli("generate", "--model", str(demo_dir), "--prompt", "Why is the sky blue?", "--chat", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and b"denoising steps" in r.stderr
    r = dgemma_cli("chat", "--model", str(demo_dir), "--seed", "1", "--system", "Be brief.",
                   input=b"Hello!\n\nHow are you?\n/reset\nAgain\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.decode().strip().splitlines()) >= 3
    assert b"Traceback" not in r.stderr


def test_show_drafts_numbers_steps_upwards(demo_dir, capsys):
    assert main(["generate", "--model", str(demo_dir), "--prompt", "Hi", "--show-drafts", "--steps", "5",
                 "--max-new-tokens", "64", "--seed", "3"]) == 0
    drafts = re.findall(r"^\[block (\d+) step (\d+)\]", capsys.readouterr().out, re.M)
    by_block: dict[int, list[int]] = {}
    for block, step in drafts:
        by_block.setdefault(int(block), []).append(int(step))
    assert by_block and sum(map(len, by_block.values())) >= 2
    for steps in by_block.values():
        assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 5


# --- rough edges ----------------------------------------------------------------------------------------

def test_chat_without_tokenizer_fails_at_once(no_tokenizer_dir):
    r = dgemma_cli("chat", "--model", str(no_tokenizer_dir), input=b"Hello\nHello again\n")
    assert r.returncode != 0 and r.stdout == b""
    assert "tokenizer.json" in one_error_line(r.stderr)
    r = dgemma_cli("generate", "--model", str(no_tokenizer_dir), "--prompt", "Hi")
    assert r.returncode != 0 and "tokenizer.json" in one_error_line(r.stderr)


def test_chat_without_template_fails_at_once(demo_dir, tmp_path):
    import shutil

    bare = tmp_path / "no-template"
    shutil.copytree(demo_dir, bare)
    (bare / "chat_template.jinja").unlink()
    r = dgemma_cli("chat", "--model", str(bare), input=b"Hello\n")
    assert r.returncode != 0 and "chat template" in one_error_line(r.stderr)


def test_model_file_asks_for_its_directory(demo_dir, capsys):
    assert main(["chat", "--model", str(demo_dir / "model.safetensors")]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert "is a file" in line and f"({demo_dir})" in line
    assert main(["generate", "--model", str(demo_dir / "missing"), "--prompt", "x"]) != 0
    assert "checkpoint directory not found" in one_error_line(capsys.readouterr().err)


def test_inputs_are_checked_before_loading(demo_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(demo_dir), "--prompt", "Hi", "--image", str(tmp_path / "nope.png")]) != 0
    assert "no such file" in one_error_line(capsys.readouterr().err)
    assert main(["generate", "--model", str(demo_dir), "--prompt", "  "]) != 0
    assert "--prompt is empty" in one_error_line(capsys.readouterr().err)
    assert main(["chat", "--model", str(demo_dir), "--device", "cuda:7"]) != 0
    one_error_line(capsys.readouterr().err)
    assert main(["bench", "--json", str(tmp_path / "no" / "dir" / "out.json")]) != 0
    err = capsys.readouterr().err
    assert "no such directory" in one_error_line(err) and "copy bandwidth" not in err


@pytest.mark.parametrize("seed", [str(2**70), "-1", "1.5"])
def test_seed_out_of_range_is_one_line(seed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", "--prompt", "x", "--seed", seed])
    assert e.value.code == 2 and "--seed" in one_error_line(capsys.readouterr().err)


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path):
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = dict(ENV, PYTHONPATH=str(blocker.parent))
    r = dgemma_cli("bench", "--plot", str(tmp_path / "out.png"), env=env)
    assert r.returncode != 0
    assert "--plot needs matplotlib" in one_error_line(r.stderr)  # one line: nothing was benchmarked


def test_bench_table_prints_dashes_for_absent_values():
    import io

    report = {"results": [
        {"name": "copy_bandwidth", "median_ms": 9.6, "gb_per_s": 15.6},
        {"name": "denoise_step_bfloat16_b1", "median_ms": 210.9, "roofline_ms": 0.066, "roofline_share": 0.0003,
         "batch": 1},
        {"name": "peak_memory", "median_ms": 0.0, "peak_mib": 390.8},
    ]}
    cpu = io.StringIO()
    print_bench_table(report, cpu, roofline=False)
    table = cpu.getvalue()
    assert "nan" not in table and "0.0%" not in table and "0.000" not in table and "0.066" not in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["denoise_step_bfloat16_b1"][1:4] == ["210.900", "-", "-"]
    assert rows["peak_memory"][1:4] == ["-", "-", "-"]
    gpu = io.StringIO()
    print_bench_table(report, gpu, roofline=True)
    rows = {line.split()[0]: line.split() for line in gpu.getvalue().splitlines()[1:]}
    assert rows["denoise_step_bfloat16_b1"][1:4] == ["210.900", "0.066", "0.0%"]
    assert rows["copy_bandwidth"][2:4] == ["-", "-"] and "nan" not in gpu.getvalue()


def test_bench_table_lists_where_a_step_spends_its_gpu_time():
    import io

    top = [{"name": f"kernel_{i}", "launches": 30 - i, "total_ms": 2.0 - 0.1 * i} for i in range(12)]
    report = {"results": [{"name": "denoise_step_fp8_b1", "median_ms": 12.5, "kernels": 540, "top_kernels": top}]}
    out = io.StringIO()
    print_bench_table(report, out, roofline=True)
    text = out.getvalue()
    header, *lines = text.splitlines()
    assert "top_kernels" not in lines[0] and "kernels=540" in lines[0]
    listed = [line for line in lines if "kernel_" in line]
    assert len(listed) == 8 and listed[0].split()[:3] == ["2.000", "ms", "30x"]
    assert "denoise_step_fp8_b1: where the GPU time goes" in text


def test_closed_stdout_exits_nonzero_quietly(demo_dir):
    for args in (["--help"], ["generate", "--model", str(demo_dir), "--prompt", "Hi", "--seed", "0"]):
        read, write = os.pipe()
        os.close(read)
        try:
            r = subprocess.run([sys.executable, "-m", "dgemma", *args], stdout=write, stderr=subprocess.PIPE,
                               env=ENV, timeout=300)
        finally:
            os.close(write)
        assert r.returncode != 0, args
        assert b"Traceback" not in r.stderr and b"Exception ignored" not in r.stderr and b"BrokenPipe" not in r.stderr


def test_non_utf8_input_is_replaced_not_a_traceback(demo_dir):
    r = dgemma_cli(b"generate", b"--model", os.fsencode(demo_dir), b"--prompt", b"caf\xe9 \xff\xfe ok", b"--seed",
                   b"0")
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    r = dgemma_cli("chat", "--model", str(demo_dir), "--seed", "0", input=b"caf\xe9 \xff hello\n\xc3\x28\n")
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr and len(r.stdout.decode().strip().splitlines()) >= 2


def test_chat_from_a_pipe_reports_failed_turns(demo_dir, tmp_path):
    r = dgemma_cli("chat", "--model", str(demo_dir), input=f"/image {tmp_path / 'missing.png'}\nHello\n".encode())
    assert r.returncode != 0
    assert "no such file" in r.stderr.decode() and r.stdout.strip()


# --- README examples ------------------------------------------------------------------------------------

def runnable_blocks(markdown: str) -> list[str]:
    """Python code blocks preceded by a ``<!-- runnable -->`` comment."""
    return re.findall(r"<!-- runnable -->\s*\n```python\n(.*?)```", markdown, re.S)


def test_readme_runnable_examples_run_on_the_demo_checkpoint(demo_dir, capsys):
    blocks = runnable_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any("generate_stream" in b for b in blocks) and any("eng.denoise" in b for b in blocks)
    for code in blocks:
        assert "path/to/diffusiongemma" in code
        exec(compile(code.replace("path/to/diffusiongemma", str(demo_dir)), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_shows_the_first_hour():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in ("pip install torch==2.13.0 .", "dgemma demo --save demo-ckpt", "dgemma chat --model demo-ckpt",
                 "--no-build-isolation", "DGEMMA_ENABLE_CUDA=OFF", "DGEMMA_TEST_THREADS", "Hugging Face Hub"):
        assert text in readme, text


# --- version and packaging ------------------------------------------------------------------------------

def test_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r"^version\s*=", pyproject, re.M) and 'dynamic = ["version"]' in pyproject
    init = (ROOT / "python" / "dgemma" / "__init__.py").read_text(encoding="utf-8")
    assert re.findall(r'^__version__ = "(.+)"$', init, re.M) == [dgemma.__version__]
    assert importlib.metadata.version("dgemma") == dgemma.__version__
    from dgemma import _C

    assert _C.version() == dgemma.__version__


def test_wheel_ships_py_typed_and_license():
    files = {str(f) for f in importlib.metadata.files("dgemma")}
    assert "dgemma/py.typed" in files
    assert any(f.endswith("/LICENSE") and ".dist-info/" in f for f in files), sorted(files)
    meta = importlib.metadata.metadata("dgemma")
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
