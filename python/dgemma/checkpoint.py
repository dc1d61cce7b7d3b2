"""Reading Hugging Face safetensors checkpoints (single file or sharded), validated and copied.

The safetensors header is parsed here with exactly the checks of the ``safetensors`` library's own
reader (``safetensors::tensor::read_metadata``): a header of at most 100 MB that is UTF-8 JSON starting
with ``{``, entries of a known dtype with non-negative integer shapes and two ``data_offsets``, the
entries' byte ranges contiguous from 0, non-overlapping and together exactly the rest of the file, and
each range exactly ``numel × itemsize`` bytes. It is parsed here rather than with ``safe_open`` so that
every problem is a :class:`~dgemma.errors.CheckpointError` naming the file and the tensor, and so that
tensors are read with ordinary (positional) file reads into memory the engine owns.

NOTE: weights are copies, never views of a memory mapping. A mapped tensor stays tied to the file: if
the file is truncated after loading, the next access to a missing page kills the process with SIGBUS,
and rewriting the file in place silently changes the live weights. Reading each tensor into its own
buffer costs the same I/O, keeps the peak at the loaded model plus one tensor, and makes the engine
independent of the file once :func:`load_tensors` returns.

Shard paths named by ``model.safetensors.index.json`` must stay inside the checkpoint directory (no
absolute paths, no ``..``, no symlink leading out of it, except the Hugging Face cache's own layout where
``snapshots/<rev>/<file>`` links to ``../../blobs/<hash>``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import ModelConfig, read_json_file
from .errors import CheckpointError
from .formats import STORED_DTYPES, detect_format
from .weights import expected_shapes, ignored_kind, tied_twin, vision_shapes, weight_map

logger = logging.getLogger("dgemma")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Bits per element of every dtype the safetensors format defines (sub-byte types pack).
_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
         "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "U32": 32, "U64": 64, "C64": 64,
         "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# safetensors' MAX_HEADER_SIZE.
MAX_HEADER_BYTES = 100_000_000
_USIZE = 1 << 64
# Checkpoints above this size show a progress bar while loading (unless progress= says otherwise).
PROGRESS_MIN_BYTES = 1 << 30
# Checkpoints whose loaded tensors are at most this many bytes are scanned for NaN/Inf at load (unless
# check_finite= says otherwise): a full scan reads every weight once more, cheap next to the read itself.
FINITE_CHECK_MAX_BYTES = 2 << 30
_READ_CHUNK = 64 << 20  # bytes per read() call and per finiteness-scan chunk
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class TensorEntry:
    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _uint(v) -> bool:
    return type(v) is int and 0 <= v < _USIZE


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; return its tensors by name."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {hlen} header bytes, "
                                      f"more than the limit of {MAX_HEADER_BYTES})")
            if hlen > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {hlen} header bytes, file has {size})"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) != hlen:
        raise CheckpointError(f"{path}: truncated while reading its header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{path}: corrupt safetensors header (does not start with '{{')")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (key {e.args[0]!r:.80} appears twice)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError:  # JSONDecodeError
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + hlen
    infos = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        what = f"{path}: corrupt safetensors header entry {key!r:.200}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _BITS:
            raise CheckpointError(f"{what}: dtype {dtype!r:.40} is not a safetensors dtype "
                                  f"({', '.join(_BITS)})")
        if not isinstance(shape, list) or not all(_uint(s) for s in shape):
            raise CheckpointError(f"{what}: shape {shape!r:.80} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
            raise CheckpointError(f"{what}: data_offsets {offsets!r:.80} is not a pair of non-negative integers")
        infos.append((offsets[0], offsets[1], key, dtype, tuple(shape)))
    # Exactly safetensors' Metadata::validate: sorted by offsets, each range starts where the last
    # ended (no gap, no overlap), is not reversed and holds numel × bits / 8 bytes.
    infos.sort(key=lambda x: (x[0], x[1]))
    entries = {}
    end_of_data = 0
    for begin, end, key, dtype, shape in infos:
        if begin != end_of_data or end < begin:
            raise CheckpointError(f"{path}: tensor {key!r:.200} has data_offsets [{begin}, {end}], expected to "
                                  f"start at byte {end_of_data} (ranges must be contiguous and not overlap)")
        end_of_data = end
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r:.200} needs bytes up to {data_start + end}, "
                                  f"file has {size}")
        numel = 1
        for s in shape:
            numel *= s
            if numel >= _USIZE:
                raise CheckpointError(f"{path}: tensor {key!r:.200} has shape {list(shape)}: too many elements")
        bits = numel * _BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise CheckpointError(
                f"{path}: corrupt entry {key!r:.200}: {end - begin} bytes for shape {list(shape)} of {dtype}"
            )
        entries[key] = TensorEntry(key, path, dtype, shape, data_start + begin, end - begin)
    if data_start + end_of_data != size:
        raise CheckpointError(f"{path}: corrupt safetensors file: the tensors end at byte "
                              f"{data_start + end_of_data}, the file has {size} (trailing data)")
    logger.debug("read %d tensor headers from %s", len(entries), name)
    return entries


def _confined(directory: str, rel, what: str) -> str:
    """``rel`` (named by ``what``) joined to ``directory``; refused unless it stays inside it."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CheckpointError(f"{what} = {rel!r:.80}, expected a shard file name")
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise CheckpointError(f"{what} = {rel!r:.200} lies outside the checkpoint directory (shard names must "
                              "be relative, without '..')")
    path = os.path.join(directory, rel)
    real, root = os.path.realpath(path), os.path.realpath(directory)
    if not _inside(real, root) and not _hf_cache_blob(real, root):
        raise CheckpointError(f"{what} = {rel!r:.200} is a link to {real}, outside the checkpoint directory")
    return path


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _hf_cache_blob(real: str, root: str) -> bool:
    """Whether ``real`` is a blob of the Hugging Face cache repository whose snapshot ``root`` is
    (``<repo>/snapshots/<rev>`` links its files to ``<repo>/blobs/<hash>``)."""
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) != "snapshots":
        return False
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.dirname(real) == blobs


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (the index's shards, or the single file)."""
    return _checkpoint_layout(path)[0]


@functools.lru_cache(maxsize=64)
def _warn_stale_index(path: str) -> None:
    logger.warning("dgemma: %s has both %s and %s: loading %s, as transformers does", path, SINGLE_FILE, INDEX_FILE,
                   SINGLE_FILE)


# Activation scales of a quantised linear (compressed-tensors' static input scales): checked, never used.
_ACTIVATION_SCALES = ("input_scale", "input_global_scale")


def _checkpoint_layout(path: str) -> tuple[list[str], dict[str, str]]:
    """(the safetensors files, the index's weight_map as tensor name -> shard path: empty without an index).
    Shard names are normalised ("./x" and "x" are one shard)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index) and os.path.isfile(single):
        # As transformers: the single file wins (saving unsharded over a sharded save leaves the old index behind).
        _warn_stale_index(path)
        return [_confined(path, SINGLE_FILE, f"{path}: {SINGLE_FILE}")], {}
    if os.path.isfile(index):
        raw = read_json_file(index, CheckpointError, object_only=False, invalid="not a valid safetensors index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a non-empty 'weight_map' object "
                                  f"of tensor name -> shard file, got {type(weight_map).__name__})")
        shards: dict[str, str] = {}  # normalised shard name -> path
        names: dict[str, str] = {}  # shard name as written -> normalised
        placement: dict[str, str] = {}
        for key, rel in weight_map.items():
            if not isinstance(rel, str) or rel not in names:
                what = f"{index}: weight_map[{key!r:.200}]"
                _confined(path, rel, what)  # the name as written: refused (by name) unless it stays inside
                name = os.path.normpath(rel)
                if name == ".":
                    raise CheckpointError(f"{what} = {rel!r:.80}, expected a shard file name")
                if name not in shards:
                    shards[name] = _confined(path, name, what)
                names[rel] = name
            placement[key] = shards[names[rel]]
        files = [shards[s] for s in sorted(shards)]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"missing shard {os.path.relpath(f, path)} (listed in {index})")
        return files, placement
    if os.path.isfile(single):
        return [_confined(path, SINGLE_FILE, f"{path}: {SINGLE_FILE}")], {}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def check_placement(entries: dict[str, TensorEntry], placement: dict[str, str], path: str) -> None:
    """Every tensor the index's weight_map names must be in the shard it names."""
    index = os.path.join(path, INDEX_FILE)
    for key, shard in placement.items():
        e = entries.get(key)
        if e is None:
            raise CheckpointError(f"{index}: weight_map puts tensor {key!r:.200} in "
                                  f"{os.path.relpath(shard, path)}, but no shard holds it")
        if e.file != shard:
            raise CheckpointError(f"{index}: weight_map puts tensor {key!r:.200} in "
                                  f"{os.path.relpath(shard, path)}, but that shard does not hold it (it is in "
                                  f"{os.path.relpath(e.file, path)})")


def index_tensors(files: list[str]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for key, e in read_header(f).items():
            if key in entries:
                raise CheckpointError(f"tensor {key!r} appears in both {entries[key].file} and {f}")
            entries[key] = e
    return entries


def _read_tensor(f, e: TensorEntry) -> torch.Tensor:
    """The tensor of ``e`` read from the open file ``f`` into a new host tensor (the file's dtype)."""
    dtype = _DTYPES.get(e.dtype) or STORED_DTYPES[e.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=dtype)
    # NOTE: the copy starts at the same address modulo the page size as a memory mapping of the file
    # would (as transformers' and safetensors' loaders map it): CPU kernels round differently on
    # differently aligned data, and bit-for-bit parity with transformers depends on it.
    raw = torch.empty(e.nbytes + _PAGE, dtype=torch.uint8)
    shift = (e.offset - raw.data_ptr()) % _PAGE
    if shift % itemsize:
        shift -= shift % itemsize  # an unaligned offset cannot be mirrored; keep the dtype's alignment
    data = raw[shift:shift + e.nbytes]
    buf = memoryview(data.numpy())
    done = 0
    while done < e.nbytes:
        try:
            part = buf[done:done + _READ_CHUNK]
            if hasattr(os, "preadv"):
                n = os.preadv(f.fileno(), [part], e.offset + done)
            else:
                f.seek(e.offset + done)
                n = f.readinto(part)
        except OSError as err:
            raise CheckpointError(f"{e.file}: cannot read tensor {e.key!r} ({err.strerror})") from None
        if n == 0:
            raise CheckpointError(f"{e.file}: truncated while reading tensor {e.key!r} (the file changed after "
                                  f"its header was read)")
        done += n
    return data.view(dtype).view(e.shape)


def _check_finite(e: TensorEntry, t: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or ±Inf, naming it and the first bad element."""
    flat = t.view(-1)
    step = max(1, _READ_CHUNK // max(1, t.element_size()))
    for lo in range(0, flat.numel(), step):
        chunk = flat[lo:lo + step]
        if not bool(torch.isfinite(chunk).all()):
            i = lo + int((~torch.isfinite(chunk)).nonzero()[0, 0])
            index = list(torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else []
            raise CheckpointError(f"{e.file}: tensor {e.key!r} holds a non-finite value ({float(flat[i])}) at index "
                                  f"{[int(x) for x in index]}: the checkpoint is corrupt")


def load_tensors(path: str, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 progress: bool | None = None,
                 transform: Callable[[str, torch.Tensor], object | None] | None = None,
                 check_finite: bool | None = None) -> dict[str, torch.Tensor]:
    """Validate a checkpoint against ``cfg`` and load its text-model tensors as ``dtype`` on ``device``.

    Each tensor is read from the file into memory of its own (never a view of a file mapping: see the
    module note) and converted (or moved) one at a time, so the peak is the loaded model plus one
    tensor, and the result does not depend on the files once this returns.

    ``transform(key, tensor)``, when given, sees each tensor as stored (on the host, in the file's
    dtype) before any conversion; a non-None result replaces the tensor (e.g. an FP8
    :class:`~dgemma.quant.Fp8Weight`), None keeps the usual conversion. Streaming quantisation uses it.

    ``check_finite``: scan every tensor for NaN/Inf and refuse the checkpoint naming the first bad
    tensor; default: on when the tensors total at most :data:`FINITE_CHECK_MAX_BYTES`.
    """
    files, placement = _checkpoint_layout(path)
    entries = index_tensors(files)
    check_placement(entries, placement, path)
    fmt = detect_format(path)
    expected = expected_shapes(cfg)
    missing = [k for k in expected if not fmt.present(k, entries)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    # The vision tower is loaded when the config describes one and the checkpoint holds it (all of it).
    vision = vision_shapes(cfg)
    present = [k for k in vision if fmt.present(k, entries)]
    if present and len(present) < len(vision):
        absent = [k for k in vision if not fmt.present(k, entries)]
        raise CheckpointError(f"{path}: the vision tower is incomplete: missing tensor {absent[0]!r}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    if present:
        expected = {**expected, **vision}
    elif cfg.vision is not None:
        logger.warning("dgemma: %s has a vision_config but no vision-tower tensors: image inputs are unavailable",
                       path)
    stored = fmt.plan(expected, entries)  # the quantised weights, their parts validated
    parts = {k for sw in stored.values() for k in sw.keys}
    skipped = {"vision": 0, "tied": 0}
    twins: dict[str, str] = {}  # a skipped copy -> the tensor it repeats (compared once loaded)
    quantized_head = False
    for key, e in entries.items():
        if key in parts:
            continue
        if key in expected:
            if e.dtype not in _DTYPES:
                raise CheckpointError(f"{e.file}: tensor {key!r} has unsupported dtype {e.dtype} "
                                      f"(expected one of {', '.join(_DTYPES)})")
            if e.shape != expected[key]:
                raise CheckpointError(f"{e.file}: tensor {key!r} has shape {list(e.shape)}, "
                                      f"expected {list(expected[key])}")
            continue
        base = fmt.base_of(key)  # a scale of a skipped weight is skipped with it
        kind = ignored_kind(key) or (ignored_kind(base) if base is not None else None)
        if kind == "vision" and present:  # the config describes the tower: a tensor it does not is unexpected
            kind = None
        if kind is None:
            raise CheckpointError(f"{e.file}: unexpected tensor {key!r} (shape {list(e.shape)})")
        if kind != "tied" or key.endswith(_ACTIVATION_SCALES):
            pass  # activation scales: calibrated per module (copies differ legitimately), never used
        elif key.startswith("lm_head.") and (key != "lm_head.weight" or e.dtype not in _DTYPES):
            quantized_head = True  # a quantised lm_head: dgemma uses the embedding table (tied) either way
        else:  # skipped only as an exact copy of the tensor dgemma loads (untied weights would be lost)
            twin = tied_twin(key)
            t = entries.get(twin) if twin is not None else None
            if t is None or t.shape != e.shape:
                raise CheckpointError(f"{e.file}: unexpected tensor {key!r} (shape {list(e.shape)}): it repeats no "
                                      f"tensor of the checkpoint" + (f" ({twin!r} has shape {list(t.shape)})"
                                                                     if t is not None else ""))
            twins[key] = twin
        skipped[kind] += 1
    if quantized_head:
        logger.warning("dgemma: %s stores lm_head quantised; DiffusionGemma ties it to the embedding table, which "
                       "dgemma uses (lm_head is not compared with it)", path)
    if skipped["vision"]:
        why = "config.json has no vision_config" if cfg.vision is None else "none of its vision_config's tensors"
        logger.warning("dgemma: ignoring %d vision-tower tensors (%s)", skipped["vision"], why)

    total = sum(entries[k].nbytes for k in expected if k not in stored) + sum(entries[k].nbytes for k in parts)
    fp8_names = {name for name, spec in weight_map(cfg).items() if spec.quantized}
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    scan = check_finite if check_finite is not None else total <= FINITE_CHECK_MAX_BYTES
    out: dict[str, torch.Tensor] = {}
    files: dict[str, object] = {}
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
            def read(e: TensorEntry) -> torch.Tensor:
                f = files.get(e.file)
                if f is None:
                    try:
                        f = files[e.file] = open(e.file, "rb")
                    except OSError as err:
                        raise CheckpointError(f"{e.file}: cannot read ({err.strerror})") from None
                t = _read_tensor(f, e)
                if scan and e.dtype in _DTYPES:  # FP8/U8 parts: the format checks their scales and NaN codes
                    _check_finite(e, t)
                return t

            for key in expected:
                if key in stored:  # quantised in the checkpoint: the format builds what dgemma holds
                    sw = stored[key]
                    out[key] = fmt.build(sw, {k: read(entries[k]) for k in sw.keys}, dtype=dtype, device=device,
                                         keep_fp8=key in fp8_names)
                    bar.update(sum(entries[k].nbytes for k in sw.keys))
                    continue
                e = entries[key]
                t = read(e)
                replaced = transform(key, t) if transform is not None else None
                if replaced is not None:
                    out[key] = replaced
                else:
                    out[key] = t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)
                bar.update(e.nbytes)
            for key, twin in twins.items():  # tied copies: the same values, or the checkpoint is refused
                a, b = read(entries[key]).reshape(-1), read(entries[twin]).reshape(-1)
                if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
                    same = a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                else:  # the same values in two float dtypes: compared a slice at a time (no fp32 copy of both)
                    step = 1 << 24
                    same = all(torch.equal(a[i:i + step].float(), b[i:i + step].float())
                               for i in range(0, a.numel(), step))
                del a, b
                if not same:
                    raise CheckpointError(f"{entries[key].file}: tensor {key!r} differs from {twin!r}, which dgemma "
                                          f"uses for both (DiffusionGemma ties them); untied weights are not "
                                          f"supported")
    finally:
        for f in files.values():
            f.close()
    return out


def checkpoint_dtype(path: str) -> torch.dtype:
    """The floating dtype most of a checkpoint's bytes are stored in."""
    by_dtype: dict[str, int] = {}
    for e in index_tensors(checkpoint_files(path)).values():
        by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
    main = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return _DTYPES.get(main, torch.bfloat16)
