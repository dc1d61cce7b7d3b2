import subprocess
import sys

import torch

import dgemma
from dgemma.cli import main
from dgemma.random_checkpoint import write_random_checkpoint


def run(*args):
    return subprocess.run([sys.executable, "-m", "dgemma", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_end_to_end():
    r = run("demo", "--steps", "3", "--canvas", "16")
    assert r.returncode == 0, r.stderr
    assert "encoded 24 prompt tokens" in r.stdout
    assert "denoised a 16-token canvas" in r.stdout
    ids = r.stdout.split("canvas ids:")[1].strip()
    assert len(eval(ids)) == 16


def test_bad_option_is_one_line_and_nonzero():
    r = run("demo", "--steps", "0")
    assert r.returncode != 0
    assert "expected a positive integer, got 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_error_is_one_line(capsys):
    assert main(["demo", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dgemma: error: ")


def test_version():
    r = run("--version")
    assert r.returncode == 0 and dgemma.__version__ in r.stdout


def test_random_checkpoint_loads_in_transformers_and_matches(tmp_path):
    from conftest import load_hf

    path = write_random_checkpoint(tmp_path / "rc", "tiny", seed=4, canvas_length=8)
    hf = load_hf(path, torch.float32)
    eng = dgemma.load(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (1, 40), generator=g)
    canvas = torch.randint(0, 512, (1, 8), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    ours = eng.denoise(eng.encode(prompt), canvas)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_cuda_graphs_flag_is_for_generate_and_chat(tmp_path, capsys):
    """serve refuses --cuda-graphs in one line (its requests' steps run as one batched decoder pass); on a
    CPU generate accepts it and warns that the graphs are off, with the reason."""
    from dgemma.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "demo")
    assert main(["serve", "--model", str(path), "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graphs applies to generate and chat" in err[0]
    r = run("generate", "--model", str(path), "--prompt", "hi", "--cuda-graphs", "--max-new-tokens", "8", "--steps",
            "2", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "CUDA graphs are off for this engine: not on a CUDA device" in r.stderr
