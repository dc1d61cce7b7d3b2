"""Source-level contracts of the CUDA kernels that no CPU test can exercise otherwise.

Programmatic dependent launch (csrc/kernels/pdl.cuh) lets a kernel start while the one before it is still running;
it is only safe because every kernel's first statement waits for its predecessors (pdl_begin). A new kernel that
forgot it would race under DGEMMA_PDL=1, so the contract is checked here on the sources."""

import pathlib
import re

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "kernels"
# Launched with <<<>>> on purpose, never with the PDL attribute (the pointer-array GEMM that follows reads the
# arguments it writes before its own wait).
PLAIN_LAUNCHES = {"build_grouped_args_kernel"}


def _source(path: pathlib.Path) -> str:
    """A header without its comments (a kernel named in a comment is not a kernel)."""
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S))


def _kernels() -> list[tuple[str, str, str]]:
    """(file, kernel name, body text after the opening brace) of every __global__ function."""
    found = []
    for path in sorted(KERNELS.glob("*.cuh")):
        src = _source(path)
        for m in re.finditer(r"__global__", src):
            # The parameter list: the first parenthesised group after the name (skipping __launch_bounds__(...)).
            rest = src[m.end():]
            name = re.search(r"(\w+)\s*\(", re.sub(r"__launch_bounds__\s*\([^)]*\)", "", rest, count=1)).group(1)
            depth, i = 0, rest.index(name + "(") + len(name)
            while True:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
                if depth == 0:
                    break
            body = rest[rest.index("{", i) + 1:]
            found.append((path.name, name, body))
    return found


def test_every_kernel_waits_for_its_predecessors_first():
    kernels = _kernels()
    assert len(kernels) >= 20, [k[1] for k in kernels]
    late = [f"{f}:{name}" for f, name, body in kernels if not body.lstrip().startswith("pdl_begin();")]
    assert not late, f"kernels whose first statement is not pdl_begin(): {late}"


def test_kernels_are_launched_through_launch_kernel():
    """Every launch goes through launch_kernel (the PDL attribute when enabled, errors reported once), except the
    kernels deliberately launched plainly."""
    plain = []
    for path in sorted(KERNELS.glob("*.cuh")):
        for m in re.finditer(r"(\w+)(?:<[^<>]*>)?<<<", _source(path)):
            if m.group(1) not in PLAIN_LAUNCHES:
                plain.append(f"{path.name}:{m.group(1)}")
    assert not plain, f"kernels launched with <<<>>> instead of launch_kernel: {plain}"
