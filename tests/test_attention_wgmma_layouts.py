"""The wgmma attention kernel's hand-built layouts, checked on the host (no GPU needed).

The kernel (csrc/kernels/sm90_attention_wgmma.cuh) reinterprets CuTe's wgmma accumulator registers twice: as a
(rows, columns) view for the online softmax, and as the A operand of the P·V wgmma. It also writes its shared-memory
tiles with cp.async at addresses it takes from the swizzled CuTe layouts. tests/host/attention_wgmma_layouts.cu
evaluates those layouts against the MMA atoms' own thread/value layouts; it is compiled with the CUDA toolkit that
builds the extension and run on the CPU.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cutlass_include() -> pathlib.Path | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    include = pathlib.Path(spec.origin).parent / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").exists() else None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build_and_run(tmp_path, name: str) -> None:
    """Compile tests/host/<name>.cu for the host (and sm_90a, as the extension is) and run it: it prints "ok"."""
    nvcc, include = _nvcc(), _cutlass_include()
    if nvcc is None or include is None:
        pytest.skip("needs the CUDA toolkit (nvcc) and nvidia-cutlass")
    exe = tmp_path / name
    build = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"), "-isystem",
                            str(include), "-gencode", "arch=compute_90a,code=sm_90a", "-o", str(exe),
                            str(ROOT / "tests" / "host" / f"{name}.cu")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-4000:] + run.stderr[-2000:]


def test_wgmma_attention_register_and_shared_layouts(tmp_path):
    _build_and_run(tmp_path, "attention_wgmma_layouts")


def test_key_row_walk_names_key_sources_addresses(tmp_path):
    """Both attention kernels gather their key rows through KeyRowWalk (running pointers over all a CTA's tiles,
    reseated at segment changes); tests/host/attention_key_rows.cu checks it against key_source row by row: ring and
    linear caches of many sizes, windows, prefixes and tails, every thread's rows of every tile from several first
    (split) tiles."""
    _build_and_run(tmp_path, "attention_key_rows")
