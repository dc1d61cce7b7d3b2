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
    info = read_dynamic(C.__file__)
    assert any(n.startswith("libstdc++.so") for n in info.needed), info.needed
    assert "__cxa_throw" not in info.defined
    r = subprocess.run([sys.executable, CHECK, C.__file__, "--runtime", *runtime()], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


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


def runtime():
    r = subprocess.run([sys.executable, CHECK, "--find-runtime"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert [os.path.basename(p).split(".so")[0] for p in paths] == ["libstdc++", "libgcc_s"], paths
    return paths


def test_naming_the_interpreters_runtime_beats_static_flags(built):
    """What the build does (cmake/SharedCxxRuntime.cmake): the interpreter's own runtime libraries, named
    by path, win over a compiler driver told to link statically."""
    libs = runtime()
    r = subprocess.run([sys.executable, CHECK, str(built("forced", "-static-libstdc++", "-static-libgcc", *libs)),
                        "--runtime", *libs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_rejects_symbol_versions_the_runtime_lacks(built, tmp_path):
    """A module built by a newer compiler than the interpreter's runtime would fail to import: a stand-in
    libstdc++.so.6 that defines only GLIBCXX_3.4 makes the check name the versions it lacks."""
    (tmp_path / "v.map").write_text("GLIBCXX_3.4 { global: dgemma_dummy; local: *; };\n")
    (tmp_path / "d.cpp").write_text('extern "C" int dgemma_dummy() { return 0; }\n')
    old = tmp_path / "libstdc++.so.6"
    subprocess.run(["g++", "-shared", "-fPIC", str(tmp_path / "d.cpp"), "-Wl,-soname,libstdc++.so.6",
                    f"-Wl,--version-script={tmp_path / 'v.map'}", "-o", str(old)], check=True)
    module = built("shared")
    r = subprocess.run([sys.executable, CHECK, str(module), "--runtime", str(old)], capture_output=True, text=True)
    assert r.returncode == 1 and "needs symbol versions" in r.stderr and "GLIBCXX_3.4.9" in r.stderr, r.stderr
    ok = subprocess.run([sys.executable, CHECK, str(module), "--runtime", *runtime()], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_non_elf_files_are_reported_not_rejected(tmp_path):
    f = tmp_path / "module.pyd"
    f.write_bytes(b"MZ not an ELF file")
    r = check(f)
    assert r.returncode == 0 and "not an ELF file" in r.stdout
