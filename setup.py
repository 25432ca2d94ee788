"""Builds noam_ext._C: the fused AdamW ops, registered with the PyTorch dispatcher.

Switches (environment variables):
  NOAM_EXT_NO_CUDA=1     build the CPU implementation only, even where CUDA could be built.
  NOAM_EXT_FORCE_CUDA=1  fail instead of silently skipping CUDA when it cannot be built
                         (CI sets this so the CUDA code can never land uncompiled).
  NOAM_EXT_SANITIZE=1    compile the host code with -fsanitize=address,undefined (scripts/sanitize.sh).
  TORCH_CUDA_ARCH_LIST   GPU architectures to build for; when unset and no GPU is visible,
                         "8.0;9.0+PTX" (A100, H100/H200, and PTX for newer cards).

Build with `pip install --no-build-isolation .`: the extension must be compiled
against the torch you run it with, and an isolated build environment would
download and build against a different torch.
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup



def _cuda_home_from_nvcc():
    """The toolkit that the nvcc on PATH belongs to (nvcc may be a wrapper script, from
    which torch would guess a wrong CUDA_HOME such as /usr/local)."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            if (top / "include" / "cuda_runtime.h").exists():
                os.environ["CUDA_HOME"] = str(top)
            return


_cuda_home_from_nvcc()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# -ffp-contract=off: the compiler must not fuse a*b+c into one FMA on its own;
# that would change roundings between instruction sets and away from PyTorch.
# -fopenmp: at::parallel_for is a header template that runs in parallel only where
# _OPENMP is defined; without it the CPU op silently runs on one thread. torch ships
# its own libgomp.so.1, which the extension then shares (one OpenMP runtime).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# NOAM_EXT_SANITIZE=1 (scripts/sanitize.sh): AddressSanitizer and UndefinedBehaviorSanitizer
# in the host code, with frame pointers for readable reports. CPU-only builds.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
# No --use_fast_math (it replaces IEEE division and sqrt); --fmad=false for the
# same reason as -ffp-contract=off on the host: identical roundings on CPU and GPU.
# -Xptxas: print each kernel's registers, spills and stack, and warn on every register
# spill (the build log shows them); scripts/check_cuda_kernels.py, which every CUDA build
# of scripts/env.sh runs, fails on any spill in noam_ext's kernels. (Not ptxas's
# --warning-as-error: it would also fail on spills inside CUDA's own division slow path,
# which ptxas compiles as a function shared by kernels of different register budgets.)
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v,--warn-on-spills"]

# The CPU element loop is compiled once per x86 instruction set and chosen at
# run time (csrc/cpu/cpu_capability.cpp); no -march=native, so a wheel built
# here runs on any x86-64 CPU.
X86_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def log(message: str) -> None:
    print(f"noam_ext setup: {message}", file=sys.stderr)


def cuda_sources() -> list[str]:
    """The CUDA op: its kernels and launches (.cu, nvcc) and its registration (.cpp)."""
    return sorted(str(p) for p in (CSRC / "cuda").glob("*.cu")) + sorted(str(p) for p in (CSRC / "cuda").glob("*.cpp"))


def should_build_cuda() -> bool:
    if env_flag("NOAM_EXT_NO_CUDA"):
        log("CUDA disabled by NOAM_EXT_NO_CUDA; building the CPU implementation only")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if not list((CSRC / "cuda").glob("*.cu")):
        reasons.append("there is no CUDA source yet (csrc/cuda/*.cu)")
    if reasons:
        message = "not building CUDA: " + "; ".join(reasons)
        if env_flag("NOAM_EXT_FORCE_CUDA"):
            raise RuntimeError(message + " (NOAM_EXT_FORCE_CUDA is set)")
        log(message)
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    log(f"building CUDA with nvcc from {cpp_extension.CUDA_HOME} for "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPU)')}")
    return True


def is_x86_64() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64"}


def instruction_set_of(flags: list[str]) -> str | None:
    """The x86 instruction set a per-ISA source is compiled for (None: the baseline)."""
    for flag in flags:
        if flag.startswith("-DCPU_CAPABILITY=") and flag != "-DCPU_CAPABILITY=DEFAULT":
            return flag.split("=", 1)[1]
    return None


def rename_shared_copies(obj: str, isa: str) -> None:
    """Gives an AVX2 or AVX-512 object's copies of inline functions names of their own.

    An inline function or template instantiation that the element loop's header pulls in
    (ours, torch's, the C++ library's) is a weak symbol, compiled here with the wider
    instruction set. The linker keeps one copy per name for the whole .so, maybe this
    one, and a baseline caller would then run AVX-512 code (SIGILL on an older CPU).
    Renamed (name.noam_ext_AVX2), the copy serves this object alone. Our own element
    loops are in the CPU_CAPABILITY namespace already (segment_kernel_impl.h), and the
    dispatch table in cpu_capability.cpp links to them by name: they keep theirs.
    scripts/audit_symbols.py checks the linked objects.
    """
    import subprocess

    own_namespace = f"{len(isa)}{isa}"   # the mangled inline namespace, e.g. 4AVX2
    listing = subprocess.run(["nm", "--defined-only", "-P", obj], capture_output=True, text=True,
                             check=True).stdout
    renames = [f"{name} {name}.noam_ext_{isa}" for name, kind, *_ in (line.split() for line in listing.splitlines())
               if kind == "W" and f"8noam_ext3cpu{own_namespace}" not in name]
    if renames:
        table = obj + ".renames"
        Path(table).write_text("\n".join(renames) + "\n")
        subprocess.run(["objcopy", f"--redefine-syms={table}", obj], check=True)


def keep_objects(build_temp: str, ext) -> None:
    """Copies the objects just linked into build/objects/, with a manifest of how each was
    compiled, for scripts/audit_symbols.py (the build's own folder is temporary)."""
    import json
    import shutil

    nvcc_objects = {Path(source).stem for source in ext.sources if source.endswith(".cu")}
    instruction_sets = {Path(source).stem: isa for source, isa in ext.instruction_set_objects.items()}
    kept = ROOT / "build" / "objects"
    shutil.rmtree(kept, ignore_errors=True)
    entries = []
    for obj in sorted(Path(build_temp).rglob("*.o")):
        relative = obj.relative_to(build_temp)
        (kept / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(obj, kept / relative)
        entries.append({"path": str(relative), "compiler": "nvcc" if obj.stem in nvcc_objects else "c++",
                        "isa": instruction_sets.get(obj.stem)})
    (kept / "manifest.json").write_text(json.dumps({"objects": entries}, indent=1) + "\n")


class BuildExtensionPerIsa(cpp_extension.BuildExtension):
    """BuildExtension that compiles some sources with flags of their own.

    setuptools gives every source of an extension the same flags; the CPU
    element loop needs one object per instruction set. Those sources are
    compiled first, with their extra flags, side by side (MAX_JOBS at a time; each
    in a folder of its own, where its ninja file is written), and linked in as
    extra objects.
    """

    def build_extension(self, ext):
        from concurrent.futures import ThreadPoolExecutor

        per_source_flags = getattr(ext, "per_source_flags", {})
        if per_source_flags:
            base = ext.extra_compile_args
            base_cxx = list(base.get("cxx", [])) if isinstance(base, dict) else list(base)

            def compile_one(item):
                index, (source, flags) = item
                objects = self.compiler.compile(
                    [source],
                    output_dir=os.path.join(self.build_temp, f"isa{index}"),
                    macros=list(ext.define_macros),
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": base_cxx + flags, "nvcc": []},
                    depends=ext.depends,
                )
                isa = instruction_set_of(flags)
                if isa is not None:
                    for obj in objects:
                        rename_shared_copies(obj, isa)
                return objects

            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(per_source_flags)))) as pool:
                for objects in pool.map(compile_one, enumerate(per_source_flags.items())):
                    ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.per_source_flags = {}
        super().build_extension(ext)
        keep_objects(self.build_temp, ext)


def make_extension():
    with_cuda = should_build_cuda()
    sources = [str(CSRC / "ops.cpp"), str(CSRC / "python_module.cpp"), str(CSRC / "noam_ext" / "storage.cpp"),
               str(CSRC / "noam_ext" / "quantization.cpp"),
               str(CSRC / "cpu" / "adamw_cpu.cpp"),
               str(CSRC / "cpu" / "cpu_capability.cpp"),
               str(CSRC / "cpu" / "grad_norm_cpu.cpp")]
    # -fwrapv: the element loops hash and split bits in Vectorized<int32_t>, whose portable
    # (DEFAULT) build is plain signed int arithmetic; wrapping makes its overflow defined,
    # as it is in the vector instructions of the other builds.
    per_source_flags = {str(CSRC / "cpu" / "segment_kernel_default.cpp"): ["-DCPU_CAPABILITY=DEFAULT", "-fwrapv"]}
    define_macros = []
    if is_x86_64():
        for isa, flags in X86_ISA_FLAGS.items():
            source = str(CSRC / "cpu" / f"segment_kernel_{isa.lower()}.cpp")
            per_source_flags[source] = [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}", "-fwrapv", *flags]
            define_macros.append((f"NOAM_EXT_HAVE_{isa}", None))
    depends = sorted(str(p) for p in CSRC.rglob("*.h")) + sorted(str(p) for p in CSRC.rglob("*.cuh"))
    extra_compile_args = {"cxx": list(CXX_FLAGS)}
    link_flags = list(LINK_FLAGS)
    if env_flag("NOAM_EXT_SANITIZE"):
        log("building with -fsanitize=address,undefined (run with libasan preloaded: scripts/sanitize.sh)")
        extra_compile_args["cxx"] += SANITIZE_FLAGS
        link_flags += SANITIZE_FLAGS
    if with_cuda:
        sources += cuda_sources()
        define_macros.append(("NOAM_EXT_WITH_CUDA", None))
        extra_compile_args["nvcc"] = list(NVCC_FLAGS)
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    ext = extension_class(
        name="noam_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
        depends=depends,
    )
    ext.per_source_flags = per_source_flags
    ext.instruction_set_objects = {source: instruction_set_of(flags) for source, flags in per_source_flags.items()
                                   if instruction_set_of(flags)}
    return ext


setup(
    packages=find_packages(include=["noam_ext", "noam_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtensionPerIsa.with_options(
        use_ninja=True, no_python_abi_suffix=False)},
)
