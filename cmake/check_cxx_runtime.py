"""Check that a built extension module uses the process's shared C++ runtime.

dgemma._C runs inside a process whose C++ runtime is already loaded (torch links libstdc++.so.6).
A module that carries its own static copy of libstdc++ or libgcc has a second set of locale, iostream
and exception-handling state: formatting a message or throwing an exception then crashes the process.

  check_cxx_runtime.py MODULE [--runtime LIB ...]
reads the ELF file and fails (exit 1, one explanation per problem) unless the module
  - lists libstdc++.so.* and libgcc_s.so.* among its DT_NEEDED libraries,
  - defines none of the C++ runtime's own entry points in its dynamic symbol table, and
  - needs no symbol version (GLIBCXX_3.4.32, ...) that the given runtime libraries do not define (a
    newer compiler than the interpreter's runtime: the import would fail).
  check_cxx_runtime.py --find-runtime
prints the paths of the libstdc++.so.6 and libgcc_s.so.1 this interpreter loads (what the build links).
Non-ELF files (other platforms) are reported and accepted. Standard library only; used by the build
(configure and post-build steps) and by the tests.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

# Defined only by libstdc++/libsupc++ (or libgcc's unwinder): finding one defined here means a static copy.
RUNTIME_SYMBOLS = (
    "__cxa_throw", "__cxa_allocate_exception", "__cxa_begin_catch", "__gxx_personality_v0",
    "_ZNSo9_M_insertIlEERSoT_",  # std::ostream::_M_insert<long>, the frame of the original crash
    "_ZNSt8ios_base4InitC1Ev", "_Unwind_RaiseException", "_Unwind_Resume",
)
SHT_DYNAMIC, SHT_DYNSYM, DT_NEEDED, DT_SONAME, SHN_UNDEF = 6, 11, 1, 14, 0
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
RUNTIME_SONAMES = ("libstdc++.so.6", "libgcc_s.so.1")


def _sections(data: bytes, endian: str):
    shoff, = struct.unpack_from(endian + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
    out = []
    for i in range(shnum):
        (name, kind, _flags, _addr, offset, size, link, _info, _align,
         entsize) = struct.unpack_from(endian + "IIQQQQIIQQ", data, shoff + i * shentsize)
        out.append((kind, offset, size, link, entsize))
    return out


def _string(data: bytes, table_offset: int, index: int) -> str:
    end = data.index(b"\0", table_offset + index)
    return data[table_offset + index:end].decode("utf-8", "replace")


@dataclass
class Dynamic:
    needed: list[str]
    defined: set[str]                 # defined dynamic symbols
    soname: str | None
    version_needs: dict[str, set[str]]  # library file -> symbol versions needed from it
    version_defs: set[str]            # symbol versions this library defines


def read_dynamic(path: str) -> Dynamic | None:
    """The dynamic-linking facts of a 64-bit ELF file; None if it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    endian = "<" if data[5] == 1 else ">"
    sections = _sections(data, endian)
    info = Dynamic([], set(), None, {}, set())
    for kind, offset, size, link, entsize in sections:
        strtab = sections[link][1]
        if kind == SHT_DYNAMIC:
            for pos in range(offset, offset + size, 16):
                tag, value = struct.unpack_from(endian + "qQ", data, pos)
                if tag == DT_NEEDED:
                    info.needed.append(_string(data, strtab, value))
                elif tag == DT_SONAME:
                    info.soname = _string(data, strtab, value)
        elif kind == SHT_DYNSYM:
            for pos in range(offset, offset + size, entsize or 24):
                name, _info, _other, shndx = struct.unpack_from(endian + "IBBH", data, pos)
                if shndx != SHN_UNDEF and name:
                    info.defined.add(_string(data, strtab, name))
        elif kind == SHT_GNU_VERNEED:
            pos = offset
            while True:
                _ver, count, file, aux, nxt = struct.unpack_from(endian + "HHIII", data, pos)
                names = info.version_needs.setdefault(_string(data, strtab, file), set())
                apos = pos + aux
                for _ in range(count):
                    _hash, _flags, _other, name, anext = struct.unpack_from(endian + "IHHII", data, apos)
                    names.add(_string(data, strtab, name))
                    apos += anext
                if not nxt:
                    break
                pos += nxt
        elif kind == SHT_GNU_VERDEF:
            pos = offset
            while True:
                _ver, _flags, _ndx, count, _hash, aux, nxt = struct.unpack_from(endian + "HHHHIII", data, pos)
                if count:
                    name, _anext = struct.unpack_from(endian + "II", data, pos + aux)
                    info.version_defs.add(_string(data, strtab, name))
                if not nxt:
                    break
                pos += nxt
    return info


def find_runtime() -> list[str]:
    """Paths of the C++ runtime libraries this interpreter loads (dlopen by soname, then /proc/self/maps)."""
    import ctypes

    for name in RUNTIME_SONAMES:
        ctypes.CDLL(name)
    found = {}
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            path = fields[-1] if len(fields) >= 6 else ""
            for name in RUNTIME_SONAMES:
                if os.path.basename(path).startswith(name.split(".so")[0] + ".so"):
                    found.setdefault(name, path)
    return [found[n] for n in RUNTIME_SONAMES if n in found]


def problems(path: str, runtime: list[str] = ()) -> list[str] | None:
    """What is wrong with ``path``'s C++ runtime linkage ([] if nothing); None for a non-ELF file.
    ``runtime``: the runtime libraries the module will meet at run time, to check symbol versions against."""
    info = read_dynamic(path)
    if info is None:
        return None
    found = []
    for lib in ("libstdc++.so", "libgcc_s.so"):
        if not any(n.startswith(lib) for n in info.needed):
            found.append(f"{lib}* is not among its shared libraries (DT_NEEDED: {', '.join(info.needed) or 'none'}): "
                         f"the C++ runtime was linked statically")
    own = sorted(s for s in RUNTIME_SYMBOLS if s in info.defined)
    if own:
        found.append(f"it defines the C++ runtime's own symbols ({', '.join(own)}): a static copy of "
                     f"libstdc++/libgcc is inside the module")
    for lib in runtime:
        rt = read_dynamic(lib)
        if rt is None or rt.soname is None:
            continue
        missing = sorted(info.version_needs.get(rt.soname, set()) - rt.version_defs)
        if missing:
            found.append(f"it needs symbol versions {', '.join(missing)} of {rt.soname}, which the runtime "
                         f"{lib} does not define (the compiler is newer than that runtime; the import would fail)")
    return found


def main(argv: list[str]) -> int:
    if argv[1:] == ["--find-runtime"]:
        paths = find_runtime()
        print("\n".join(paths))
        return 0 if len(paths) == len(RUNTIME_SONAMES) else 1
    if len(argv) < 2 or (len(argv) > 2 and argv[2] != "--runtime"):
        print("usage: check_cxx_runtime.py MODULE [--runtime LIB ...] | --find-runtime", file=sys.stderr)
        return 2
    found = problems(argv[1], argv[3:])
    if found is None:
        print(f"check_cxx_runtime: {argv[1]} is not an ELF file; nothing to check")
        return 0
    if found:
        for p in found:
            print(f"error: {argv[1]}: {p}", file=sys.stderr)
        print("error: dgemma._C must use the process's shared C++ runtime (torch's libstdc++.so.6); a compiler "
              "named by CXX/CUDAHOSTCXX or flags in LDFLAGS (-static-libstdc++, -static-libgcc) linked a private "
              "copy or needs a newer runtime. Build with a compiler whose libstdc++ is not newer than the "
              "interpreter's (e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++) and without those flags.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
