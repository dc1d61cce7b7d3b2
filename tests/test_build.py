"""The extension shares the process's C++ runtime: one libstdc++ and one libgcc unwinder per process.

A module built with a private static libstdc++ crashed on a GPU machine the first time a launcher
formatted an error message. The build links the shared runtime explicitly and checks the result
(cmake/check_cxx_runtime.py); these tests run that check on the installed module and show that it
rejects a statically linked one."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "cmake", "check_cxx_runtime.py")
SOURCE = r"""
#include <sstream>
#include <stdexcept>
extern "C" int describe(long x) {
  std::ostringstream os;
  os << "[" << x << "]";
  if (x < 0) throw std::invalid_argument(os.str());
  return static_cast<int>(os.str().size());
}
"""


def check(path):
    return subprocess.run([sys.executable, CHECK, str(path)], capture_output=True, text=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check: Linux only")
def test_installed_extension_links_the_shared_cxx_runtime():
    import dgemma._C as C

    r = check(C.__file__)
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, os.path.join(ROOT, "cmake"))
    try:
        from check_cxx_runtime import read_dynamic
    finally:
        sys.path.pop(0)
    needed, defined = read_dynamic(C.__file__)
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    assert "__cxa_throw" not in defined


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    d = tmp_path_factory.mktemp("cxxrt")
    (d / "m.cpp").write_text(SOURCE)

    def build(name, *flags):
        out = d / f"{name}.so"
        subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(d / "m.cpp"), *flags, "-o", str(out)], check=True)
        return out

    return build


def test_check_rejects_a_static_runtime(built):
    r = check(built("static", "-static-libstdc++", "-static-libgcc"))
    assert r.returncode == 1
    assert "libstdc++.so* is not among its shared libraries" in r.stderr
    assert "__cxa_throw" in r.stderr and "dgemma._C must use the process's shared C++ runtime" in r.stderr


def test_check_accepts_a_shared_runtime(built):
    r = check(built("shared"))
    assert r.returncode == 0, r.stderr


def test_naming_the_shared_runtime_beats_static_flags(built):
    """What the build does (cmake/SharedCxxRuntime.cmake): the shared libraries named by path win over a
    driver told to link statically."""
    libs = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True, check=True)
            .stdout.strip() for lib in ("libstdc++.so", "libgcc_s.so")]
    r = check(built("forced", "-static-libstdc++", "-static-libgcc", *libs))
    assert r.returncode == 0, r.stderr


def test_non_elf_files_are_reported_not_rejected(tmp_path):
    f = tmp_path / "module.pyd"
    f.write_bytes(b"MZ not an ELF file")
    r = check(f)
    assert r.returncode == 0 and "not an ELF file" in r.stdout
