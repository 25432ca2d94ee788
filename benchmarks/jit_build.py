"""Fallback build for benchmarks/gpu_check.sh when `pip install --no-build-isolation .`
cannot run (e.g. no setuptools on a bare machine): compiles noam_ext._C with
torch.utils.cpp_extension.load (ninja only) and installs it into the source tree's
noam_ext/ package, which the check then imports. Only the portable CPU loop is
built here; the GPU check is about the CUDA kernel."""

from pathlib import Path
import shutil

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
sources = [CSRC / "ops.cpp", CSRC / "python_module.cpp", CSRC / "cpu" / "adamw_cpu.cpp", CSRC / "cpu" / "cpu_capability.cpp",
           CSRC / "cpu" / "cuda_emulation.cpp", CSRC / "cpu" / "segment_kernel_default.cpp",
           *sorted((CSRC / "cuda").glob("*.cu"))]
build_dir = ROOT / "build" / "jit"
build_dir.mkdir(parents=True, exist_ok=True)
module = load(name="_C", sources=[str(s) for s in sources], extra_include_paths=[str(CSRC)],
              extra_cflags=["-O3", "-ffp-contract=off", "-DCPU_CAPABILITY=DEFAULT", "-DNOAM_EXT_WITH_CUDA"],
              extra_cuda_cflags=["-O3", "--fmad=false", "--expt-relaxed-constexpr", "-DNOAM_EXT_WITH_CUDA"],
              build_directory=str(build_dir), is_python_module=True, verbose=True)
target = ROOT / "noam_ext" / Path(module.__file__).name
shutil.copy(module.__file__, target)
print("built", target, "with torch", torch.__version__)
