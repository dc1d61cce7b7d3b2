"""The ops interface: every numerical building block of the model, swappable per backend.

``reference`` is plain PyTorch (CPU or GPU, fp32/bf16) and is the oracle for every kernel test;
``cuda`` overrides the ops that have a dgemma CUDA kernel and falls back to the reference for the rest.
"""

from __future__ import annotations

from .reference import ReferenceOps

BACKENDS = ("reference", "cuda")


def get_ops(backend: str) -> ReferenceOps:
    if backend == "reference":
        return ReferenceOps()
    if backend == "cuda":
        from .cuda import CudaOps

        return CudaOps()
    raise ValueError(f"unknown backend {backend!r}, expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "ReferenceOps", "get_ops"]
