"""The launcher-error tables of test_launcher_errors_cuda.py, checked without a GPU.

That module runs only on a GPU, so a mistake in a table (a parameter the binding does not have, a known-good call
that misses one it does) would first show in a device session. Here every table is built with host tensors and a
stand-in for the workspace queries, and each table's known-good arguments are compared with the parameters its
pybind11 binding declares (names, order, and which have defaults): the table builder itself already refuses a case
that passes a parameter its known-good call lacks.
"""

from __future__ import annotations

import re

import pytest
import torch

import test_launcher_errors_cuda as tables

import dgemma._C as C


class HostCtx(tables.Ctx):
    """Tables on the host: every workspace query answers a fixed size (only the CUDA build can compute one)."""

    class Lib:
        def __getattr__(self, name):
            if name.endswith("_workspace_bytes"):
                return lambda *args, **kwargs: 1 << 16
            raise AttributeError(name)

    def __init__(self):
        super().__init__(self.Lib(), torch.device("cpu"))
        self.idx = 0

    def workspace_bytes(self, op: str, *sizes) -> int:
        return 1 << 16

    def stream(self) -> int:
        return 0


def declared(op: str) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter of the binding ``op``, from its pybind11 signature line."""
    doc = getattr(C, op).__doc__.splitlines()[0]
    inner = doc[doc.index("(") + 1:doc.rindex(")")]
    return [(name, default != "") for name, default in re.findall(r"(\w+): [^,)=]+(?:=\s*([^,)]+))?", inner)]


@pytest.mark.parametrize("op", tables.OPS)
def test_each_table_calls_its_binding_with_the_declared_parameters(op):
    table = tables.BUILDERS[op](HostCtx())
    assert table.cases, f"{op}: no error cases"
    params = declared(op)
    names = [n for n, _ in params]
    required = [n for n, has_default in params if not has_default]
    assert list(table.base) == names[:len(table.base)], (op, list(table.base), names)
    assert set(required) <= set(table.base), (op, set(required) - set(table.base))
    for case in table.cases:
        assert set(case.kwargs) <= set(names), (op, case.label, set(case.kwargs) - set(names))


def test_every_binding_with_an_error_path_has_a_table():
    names = {n for n in dir(C) if not n.startswith("_") and callable(getattr(C, n))}
    assert names - tables.NO_ERROR_PATH == set(tables.OPS) == set(tables.BUILDERS)
