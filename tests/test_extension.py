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


def test_cpu_capability_is_one_that_was_compiled():
    info = noam_ext.build_info()
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    assert "default" in info["cpu_capabilities_compiled"]


def test_cpu_op_uses_torchs_intra_op_threads():
    # at::parallel_for is a header template: in a file compiled without OpenMP it runs
    # on one thread, silently. torch's own CPU kernels use OpenMP here; ours must too.
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch is not built with OpenMP: nothing to match")
    assert noam_ext.build_info()["cpu_op_parallel"]


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(any((REPO / "noam_ext").glob("_C*.so")), reason="the source folder has an in-place build")
def test_from_the_repository_root_the_schedule_demo_runs_and_the_optimizer_explains_the_shadowing(tmp_path):
    import subprocess
    import sys
    demo = subprocess.run([sys.executable, "-m", "noam_ext.schedule_demo", "--plot", str(tmp_path / "s.png")],
                          cwd=REPO,
                          capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert "peak" in demo.stdout.lower()
    optimizer = subprocess.run([sys.executable, "-c", "import noam_ext; noam_ext.FusedAdamW"], cwd=REPO,
                               capture_output=True, text=True)
    assert optimizer.returncode != 0
    assert "imported noam_ext from the source folder" in optimizer.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="no .venv in the repository: scripts/demo.sh --help would create it first")
def test_demo_help_answers_without_installing_anything():
    import subprocess
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout and "--device" in run.stdout
    assert "installing" not in run.stderr and "building noam_ext" not in run.stderr
