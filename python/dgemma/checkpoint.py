"""Reading Hugging Face safetensors checkpoints (single file or sharded), memory-mapped and validated.

The safetensors header is parsed here rather than trusted, so that a truncated or corrupt file is
reported with its name and the tensor that does not fit, before any weight is used.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import CheckpointError
from .weights import expected_shapes, ignored_kind, vision_shapes

logger = logging.getLogger("dgemma")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024
# Checkpoints above this size show a progress bar while loading (unless progress= says otherwise).
PROGRESS_MIN_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class TensorEntry:
    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; return its tensors by name."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {hlen} header bytes, file has {size})"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != numel * itemsize:
            raise CheckpointError(
                f"{path}: corrupt entry {key!r}: {end - begin} bytes for shape {list(shape)} of {dtype}"
            )
        if begin < 0 or end < begin or data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} needs bytes up to {data_start + end}, file has {size}"
            )
        entries[key] = TensorEntry(key, path, dtype, shape, data_start + begin, end - begin)
    logger.debug("read %d tensor headers from %s", len(entries), name)
    return entries


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (the index's shards, or the single file)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        shards = sorted(set(weight_map.values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"missing shard {os.path.basename(f)} (listed in {index})")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def index_tensors(files: list[str]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for key, e in read_header(f).items():
            if key in entries:
                raise CheckpointError(f"tensor {key!r} appears in both {entries[key].file} and {f}")
            entries[key] = e
    return entries


class _MappedFiles:
    """Keeps one copy-on-write mapping per file; tensors viewing it keep it alive."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                # ACCESS_COPY gives a writable (private) view, which torch.frombuffer needs; pages stay
                # shared with the page cache unless written, so nothing is copied.
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[path] = m
        return m


def _tensor_from_entry(maps: _MappedFiles, e: TensorEntry) -> torch.Tensor:
    dtype = _DTYPES[e.dtype]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    buf = maps.get(e.file)
    numel = e.nbytes // itemsize
    if numel == 0:
        return torch.empty(e.shape, dtype=dtype)
    if e.offset % itemsize == 0:
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=e.offset)
    else:  # unaligned data cannot be viewed in place
        t = torch.frombuffer(buf, dtype=torch.uint8, count=e.nbytes, offset=e.offset).clone().view(dtype)
    return t.view(e.shape)


def load_tensors(path: str, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 progress: bool | None = None,
                 transform: Callable[[str, torch.Tensor], object | None] | None = None) -> dict[str, torch.Tensor]:
    """Validate a checkpoint against ``cfg`` and load its text-model tensors as ``dtype`` on ``device``.

    Each tensor is viewed from the memory-mapped file and converted (or moved) one at a time, so the
    peak is the loaded model plus one tensor, never two copies of the model.

    ``transform(key, tensor)``, when given, sees each tensor as stored (memory-mapped, on the host, in
    the file's dtype) before any conversion; a non-None result replaces the tensor (e.g. an FP8
    :class:`~dgemma.quant.Fp8Weight`), None keeps the usual conversion. Streaming quantisation uses it.
    """
    entries = index_tensors(checkpoint_files(path))
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    # The vision tower is loaded when the config describes one and the checkpoint holds it (all of it).
    vision = vision_shapes(cfg)
    present = [k for k in vision if k in entries]
    if present and len(present) < len(vision):
        absent = [k for k in vision if k not in entries]
        raise CheckpointError(f"{path}: the vision tower is incomplete: missing tensor {absent[0]!r}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    if present:
        expected = {**expected, **vision}
    elif cfg.vision is not None:
        logger.warning("dgemma: %s has a vision_config but no vision-tower tensors: image inputs are unavailable",
                       path)
    skipped = {"vision": 0, "tied": 0}
    for key, e in entries.items():
        if key in expected:
            if e.dtype not in _DTYPES:
                raise CheckpointError(f"{e.file}: tensor {key!r} has unsupported dtype {e.dtype} "
                                      f"(expected one of {', '.join(_DTYPES)})")
            if e.shape != expected[key]:
                raise CheckpointError(f"{e.file}: tensor {key!r} has shape {list(e.shape)}, "
                                      f"expected {list(expected[key])}")
            continue
        kind = ignored_kind(key)
        if kind is None:
            raise CheckpointError(f"{e.file}: unexpected tensor {key!r} (shape {list(e.shape)})")
        skipped[kind] += 1
    if skipped["vision"]:
        logger.warning("dgemma: ignoring %d vision-tower tensors (config.json has no vision_config)",
                       skipped["vision"])

    total = sum(entries[k].nbytes for k in expected)
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    maps = _MappedFiles()
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for key in expected:
            e = entries[key]
            t = _tensor_from_entry(maps, e)
            replaced = transform(key, t) if transform is not None else None
            if replaced is not None:
                out[key] = replaced
            else:
                out[key] = t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)
            bar.update(e.nbytes)
    return out


def checkpoint_dtype(path: str) -> torch.dtype:
    """The floating dtype most of a checkpoint's bytes are stored in."""
    by_dtype: dict[str, int] = {}
    for e in index_tensors(checkpoint_files(path)).values():
        by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
    main = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return _DTYPES.get(main, torch.bfloat16)
