"""The linked noam_ext._C holds one definition of each function, and the CUDA op launches nvcc's kernels.

Two compilations of one header in one .so (the CUDA kernels' header in the .cu and in
a host run of it; an inline function in the AVX-512 element loop and in baseline code)
give the linker two copies of each weak symbol, and it keeps one, silently: that is how
the CUDA op once came to launch host functions while every host test passed. No GPU is
needed to see it:
  - the launch pointers: run_rows' own step_launches must return, for every storage,
    with and without amsgrad, and for the prepare, update and strided launches, the
    kernel stubs that adamw_cuda.cu itself names (CUDA builds);
  - the symbol audit (scripts/audit_symbols.py) over the objects setup.py linked;
  - and the audit itself must catch a planted clash, in objects compiled here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import noam_ext
from noam_ext import _C

REPO = Path(__file__).resolve().parents[2]
AUDIT = REPO / "scripts" / "audit_symbols.py"
OBJECTS = REPO / "build" / "objects"
LAUNCHES = ("prepare", "update", "strided")


def needs_cuda_build():
    if not _C.cuda_compiled:
        if os.environ.get("NOAM_EXT_EXPECT_CUDA_BUILD") == "1":
            pytest.fail("NOAM_EXT_EXPECT_CUDA_BUILD=1 but this build has no CUDA implementation")
        pytest.skip("this build of noam_ext has no CUDA implementation (the CPU-only build): nothing to launch")


def test_every_launch_is_the_cu_files_own_kernel_stub():
    needs_cuda_build()
    pointers = _C.cuda_launch_pointers()
    storages = range(len(_C.supported_storage()))   # every storage, 8-bit moments included
    assert len(pointers) == len(storages) * 2 * len(LAUNCHES)
    seen = {(storage, amsgrad, launch) for storage, amsgrad, launch, _, _ in pointers}
    assert seen == {(s, a, launch) for s in storages for a in (False, True) for launch in LAUNCHES}
    wrong = [(storage, amsgrad, launch, hex(launched), hex(stub))
             for storage, amsgrad, launch, launched, stub in pointers if launched != stub or launched == 0]
    assert not wrong, f"run_rows would launch functions other than nvcc's kernel stubs: {wrong}"


def test_each_storage_and_amsgrad_has_kernels_of_its_own():
    needs_cuda_build()
    pointers = _C.cuda_launch_pointers()
    for launch in ("update", "strided"):
        stubs = [stub for _, _, kind, _, stub in pointers if kind == launch]
        assert len(set(stubs)) == len(stubs), f"two {launch} launches share a kernel"
    # prepare_kernel depends only on the math type (float32 for all but float64 storage); each
    # unit of storages (csrc/cuda/storage_units.cuh) has its own: at most two per unit.
    prepare = {stub for _, _, kind, _, stub in pointers if kind == "prepare"}
    assert 2 <= len(prepare) < len(pointers) // 3


def run_audit(objects_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AUDIT), str(objects_dir), *extra], capture_output=True, text=True)


def test_no_function_has_two_different_definitions_in_the_linked_extension():
    if not (OBJECTS / "manifest.json").exists():
        if os.environ.get("NOAM_EXT_EXPECT_CUDA_BUILD") is not None:   # scripts/test.sh built it just now
            pytest.fail(f"setup.py left no objects in {OBJECTS}")
        pytest.skip(f"no build objects in {OBJECTS}: build with scripts/test.sh or pip install -e . to audit them")
    manifest = json.loads((OBJECTS / "manifest.json").read_text())
    assert any(o["compiler"] == "nvcc" for o in manifest["objects"]) == bool(_C.cuda_compiled)
    result = run_audit(OBJECTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 functions with clashing copies" in result.stdout


# ---- the audit catches what it is for ---------------------------------------------------

HEADER = """
#pragma once
namespace {namespace} {{
// One inline function, compiled into two objects: its value and the flags may differ.
inline int __attribute__((noinline)) total(const int* x, int n) {{
  int s = {value};
  for (int i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}}
}}
"""
USER = """
#include "clash.h"
int use_{name}(const int* x, int n) {{ return {namespace}::total(x, n); }}
"""


def compile_objects(tmp_path: Path, variants: dict[str, tuple[str, int, list[str]]]) -> None:
    """One object per variant: name -> (namespace, the function's start value, extra flags)."""
    if not shutil.which("c++"):
        pytest.fail("no C++ compiler: the audit test compiles its own objects")
    for name, (namespace, value, flags) in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "clash.h").write_text(HEADER.format(namespace=namespace, value=value))
        (folder / f"{name}.cpp").write_text(USER.format(name=name, namespace=namespace))
        subprocess.run(["c++", "-O3", "-c", *flags, f"{name}.cpp", "-o", str(tmp_path / f"{name}.o")], cwd=folder,
                       check=True)


def write_manifest(tmp_path: Path, entries: dict[str, tuple[str, str | None]]) -> None:
    objects = [{"path": f"{name}.o", "compiler": compiler, "isa": isa} for name, (compiler, isa) in entries.items()]
    (tmp_path / "manifest.json").write_text(json.dumps({"objects": objects}))


def test_the_audit_fails_on_a_device_build_and_a_host_run_of_one_header(tmp_path):
    # As kernels.cuh once was: one name, two meanings under the two compilations' macros.
    compile_objects(tmp_path, {"device_build": ("noam_ext", 1, []), "host_run": ("noam_ext", 2, [])})
    write_manifest(tmp_path, {"device_build": ("nvcc", None), "host_run": ("c++", None)})
    result = run_audit(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "CLASH noam_ext::total(int const*, int)" in result.stdout


def test_the_audit_fails_on_any_librarys_instruction_set_copy(tmp_path):
    # The same source, for AVX2 and for the baseline: an AVX2 copy could serve baseline callers.
    compile_objects(tmp_path, {"baseline": ("other_library", 0, []), "wide": ("other_library", 0, ["-mavx2"])})
    write_manifest(tmp_path, {"baseline": ("c++", None), "wide": ("c++", "AVX2")})
    result = run_audit(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "CLASH other_library::total(int const*, int)" in result.stdout and "[AVX2]" in result.stdout


def test_the_audit_tolerates_other_libraries_within_one_compilation(tmp_path):
    compile_objects(tmp_path, {"one": ("other_library", 6, []), "two": ("other_library", 7, [])})
    write_manifest(tmp_path, {"one": ("c++", None), "two": ("c++", None)})
    result = run_audit(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "0 functions with clashing copies; 1 tolerated" in result.stdout


def test_the_audit_passes_identical_copies_across_compilations(tmp_path):
    compile_objects(tmp_path, {"device_build": ("noam_ext", 8, []), "host_run": ("noam_ext", 8, [])})
    write_manifest(tmp_path, {"device_build": ("nvcc", None), "host_run": ("c++", None)})
    result = run_audit(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "0 functions with clashing copies; 0 tolerated" in result.stdout
