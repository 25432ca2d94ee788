"""The compiled extension is built, loads from the installed package, and has
the implementations this build promises."""

import os
from pathlib import Path

import pytest
import torch

import noam_ext


def test_compiled_module_loads_from_the_package():
    from noam_ext import _C

    assert Path(_C.__file__).parent == Path(noam_ext.__file__).parent
    assert hasattr(torch.ops.noam_ext, "fused_adamw_")


def test_cpu_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("noam_ext::fused_adamw_", "CPU")


def test_build_matches_what_the_build_was_asked_for():
    # .ci/run exports NOAM_EXT_EXPECT_CUDA_BUILD (1 or 0) for each build it makes, so a
    # CUDA build that silently fell back to CPU-only (or a switch that did nothing) fails here.
    expected = os.environ.get("NOAM_EXT_EXPECT_CUDA_BUILD")
    info = noam_ext.build_info()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("noam_ext::fused_adamw_", "CUDA")
    assert info["cuda_compiled"] == has_cuda_kernel
    if expected is None:
        pytest.skip("NOAM_EXT_EXPECT_CUDA_BUILD not set: no expectation about the CUDA build to check")
    assert info["cuda_compiled"] == (expected == "1")


def test_cpu_capability_is_the_best_this_cpu_runs():
    # What the dispatch chose, against what the CPU says it has (/proc/cpuinfo), independently
    # of cpu_capability.cpp's own detection.
    info = noam_ext.build_info()
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    assert "default" in info["cpu_capabilities_compiled"]
    cpuinfo = Path("/proc/cpuinfo")
    if os.environ.get("NOAM_EXT_CPU_CAPABILITY") or not cpuinfo.exists():
        pytest.skip("the capability is forced by NOAM_EXT_CPU_CAPABILITY, or there is no /proc/cpuinfo to check it by")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    compiled = set(info["cpu_capabilities_compiled"])
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"} <= flags and "avx512" in compiled:
        expected = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags and "avx2" in compiled:
        expected = "avx2"
    else:
        expected = "default"
    assert info["cpu_capability"] == expected, (sorted(compiled), sorted(flags & {"avx2", "avx512f", "fma"}))


def test_cpu_op_uses_torchs_intra_op_threads():
    # at::parallel_for is a header template: in a file compiled without OpenMP it runs
    # on one thread, silently. torch's own CPU kernels use OpenMP here; ours must too.
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch is not built with OpenMP: nothing to match")
    assert noam_ext.build_info()["cpu_op_parallel"]


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(Path(noam_ext.__file__).resolve().parent != REPO / "noam_ext",
                    reason="noam_ext is installed as a copy, not in place (the README's scripts install it in place)")
def test_from_the_repository_root_the_package_imports_with_its_extension():
    # The scripts install in place (editable): Python started in the clone imports the
    # source folder, which then holds the compiled _C, as a notebook in the clone would.
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", "import noam_ext; noam_ext.FusedAdamW; print(noam_ext.__file__)"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve().parent == REPO / "noam_ext"


def test_a_source_checkout_without_the_extension_explains_itself_and_its_pure_parts_work(tmp_path):
    # A clone that was never built: the package folder without _C, next to a setup.py.
    import shutil
    import subprocess
    import sys
    import site
    shutil.copytree(REPO / "noam_ext", tmp_path / "noam_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tmp_path / "setup.py").write_text("")
    # A Python where noam_ext is not installed: torch and the rest from site-packages, without
    # the .pth files, one of which is the editable install's finder (it would hand the source
    # copy the built _C of this checkout).
    never_installed = dict(os.environ, PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    python = [sys.executable, "-S"]
    shutil.copy(REPO / "examples" / "schedule_demo.py", tmp_path)
    demo = subprocess.run(python + ["schedule_demo.py", "--plot", str(tmp_path / "s.png")],
                          cwd=tmp_path, env=never_installed, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert "peak" in demo.stdout.lower()
    optimizer = subprocess.run(python + ["-c", "import noam_ext; noam_ext.FusedAdamW"], cwd=tmp_path,
                               env=never_installed, capture_output=True, text=True)
    assert optimizer.returncode != 0
    assert "imported noam_ext from the source folder" in optimizer.stderr
    assert "pip install --no-build-isolation -e ." in optimizer.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="no .venv in the repository: scripts/demo.sh --help would create it first")
def test_demo_help_answers_without_installing_anything():
    import subprocess
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout and "--device" in run.stdout
    assert "installing" not in run.stderr and "building noam_ext" not in run.stderr
