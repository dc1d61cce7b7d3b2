"""Check that a built extension module uses the process's shared C++ runtime.

dgemma._C runs inside a process whose C++ runtime is already loaded (torch links libstdc++.so.6).
A module that carries its own static copy of libstdc++ or libgcc has a second set of locale, iostream
and exception-handling state: formatting a message or throwing an exception then crashes the process.
This script reads the ELF file and fails (exit 1, one explanation per problem) unless the module
  - lists libstdc++.so.* and libgcc_s.so.* among its DT_NEEDED libraries, and
  - defines none of the C++ runtime's own entry points in its dynamic symbol table.
Non-ELF files (other platforms) are reported and accepted. Standard library only; used by the build
(a post-build step) and by the tests.
"""

from __future__ import annotations

import struct
import sys

# Defined only by libstdc++/libsupc++ (or libgcc's unwinder): finding one defined here means a static copy.
RUNTIME_SYMBOLS = (
    "__cxa_throw", "__cxa_allocate_exception", "__cxa_begin_catch", "__gxx_personality_v0",
    "_ZNSo9_M_insertIlEERSoT_",  # std::ostream::_M_insert<long>, the frame of the original crash
    "_ZNSt8ios_base4InitC1Ev", "_Unwind_RaiseException", "_Unwind_Resume",
)
SHT_DYNAMIC, SHT_DYNSYM, DT_NEEDED, SHN_UNDEF = 6, 11, 1, 0


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


def read_dynamic(path: str) -> tuple[list[str], set[str]] | None:
    """(DT_NEEDED names, defined dynamic symbols) of a 64-bit ELF file; None if it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    endian = "<" if data[5] == 1 else ">"
    sections = _sections(data, endian)
    needed: list[str] = []
    defined: set[str] = set()
    for kind, offset, size, link, entsize in sections:
        strtab = sections[link][1]
        if kind == SHT_DYNAMIC:
            for pos in range(offset, offset + size, 16):
                tag, value = struct.unpack_from(endian + "qQ", data, pos)
                if tag == DT_NEEDED:
                    needed.append(_string(data, strtab, value))
        elif kind == SHT_DYNSYM:
            for pos in range(offset, offset + size, entsize or 24):
                name, _info, _other, shndx = struct.unpack_from(endian + "IBBH", data, pos)
                if shndx != SHN_UNDEF and name:
                    defined.add(_string(data, strtab, name))
    return needed, defined


def problems(path: str) -> list[str] | None:
    """What is wrong with ``path``'s C++ runtime linkage ([] if nothing); None for a non-ELF file."""
    info = read_dynamic(path)
    if info is None:
        return None
    needed, defined = info
    found = []
    for lib in ("libstdc++.so", "libgcc_s.so"):
        if not any(n.startswith(lib) for n in needed):
            found.append(f"{lib}* is not among its shared libraries (DT_NEEDED: {', '.join(needed) or 'none'}): "
                         f"the C++ runtime was linked statically")
    own = sorted(s for s in RUNTIME_SYMBOLS if s in defined)
    if own:
        found.append(f"it defines the C++ runtime's own symbols ({', '.join(own)}): a static copy of "
                     f"libstdc++/libgcc is inside the module")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_cxx_runtime.py MODULE", file=sys.stderr)
        return 2
    found = problems(argv[1])
    if found is None:
        print(f"check_cxx_runtime: {argv[1]} is not an ELF file; nothing to check")
        return 0
    if found:
        for p in found:
            print(f"error: {argv[1]}: {p}", file=sys.stderr)
        print("error: dgemma._C must use the process's shared C++ runtime (torch's libstdc++.so.6); a compiler "
              "named by CXX/CUDAHOSTCXX or flags in LDFLAGS (-static-libstdc++, -static-libgcc) linked a private "
              "copy. Build with a compiler that has a shared libstdc++ (e.g. CXX=/usr/bin/g++) and without those "
              "flags.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
