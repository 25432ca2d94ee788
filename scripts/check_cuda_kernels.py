"""Checks the compiled CUDA kernels without a GPU, from what ptxas and the SASS say.

    python scripts/check_cuda_kernels.py [BUILD_LOG [EXTENSION_SO]]

BUILD_LOG is a `pip install -v` log of a CUDA build (setup.py passes
-Xptxas=-v,--warn-on-spills, so ptxas reports each kernel's registers, spills and stack
there, and warns on every spill). Prints one line per kernel and architecture, and
fails when:
  - ptxas spilled registers in any function but CUDA's own slow paths (SLOW_PATHS: the
    IEEE division's, taken only for operands near the ends of the float range, which
    ptxas compiles as a function shared by kernels of different register budgets; its
    spills are listed, and cost nothing in the common case);
  - an update kernel (one per storage of csrc/noam_ext/storage.h, whose list this
    script reads to name them) for any storage but float64 uses more registers than 4
    resident blocks of 256 threads per SM allow (64), or 3 with amsgrad or for float16
    parameters with a float32 master (85): the occupancy csrc/cuda/launch_policy.cuh
    (min_blocks_per_sm) is built for;
  - (with EXTENSION_SO and a cuobjdump: $CUDA_HOME/bin or the one triton ships) an
    update kernel stores to global memory in pieces other than 16 bytes: every
    vector store must be one STG.E.128; the element path of misaligned tensors
    uses generic stores (ST.E*), and the one 64-bit STG is the schedule counter
    (with 8-bit moments, a lane's 8 codes of a moment are one STG.E.64 too).
Without a BUILD_LOG it compiles every csrc/cuda/*.cu itself (nvcc from CUDA_HOME or PATH,
for sm_90, the kernels' flags of setup.py) and checks what ptxas says of them.
Exit status 0 when there is nothing to check (a CPU-only build log). The whole ptxas table
goes to stdout; pass --quiet for one summary line instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

SLOW_PATHS = ("__cuda_sm3x_div_rn_noftz_f32_slowpath", "__internal_accurate_pow", "__internal_trig_reduction_slowpathd")
SPILL_WARNING = re.compile(r"Registers are spilled to local memory in function '([^']+)', (\d+) bytes spill stores")
REGISTERS_PER_SM = 65536
THREADS_PER_BLOCK = 256
STORAGE_H = Path(__file__).resolve().parents[1] / "csrc" / "noam_ext" / "storage.h"
DTYPE = {"kF64": "double", "kF32": "float", "kBF16": "bfloat16", "kF16": "half", "kQuantized": "8bit"}
MASTER = {"kNone": "", "kFloat32": "+float32 master", "kRemainder": "+remainder"}
PREPARE = {"f": "float", "d": "double"}
# update_kernel<int kStorage, bool amsgrad>, prepare_kernel<opmath_t>
KERNEL = re.compile(r"(?:(update_kernel)ILi(\d+)ELb([01])E|(prepare_kernel)I([fd])E)")


def storage_names(header: str | None = None) -> list[str]:
    """kSupportedStorage of storage.h, in order, named: the parameter's dtype for torch's
    own storages ("bfloat16"), else "param/grad/moment[+master]"."""
    text = header if header is not None else STORAGE_H.read_text()
    table = text[text.index("kSupportedStorage[] = {"):]
    table = table[:table.index("};")]
    names = []
    for param, grad, moment, master in re.findall(r"\{(k\w+), (k\w+), (k\w+), MasterKind::(k\w+)\}", table):
        plain = param == grad == moment and master == "kNone"
        names.append(DTYPE[param] if plain else f"{DTYPE[param]}/{DTYPE[grad]}/{DTYPE[moment]}{MASTER[master]}")
    return names


def describe(mangled: str, names: list[str] | None = None) -> tuple[str, str, bool] | None:
    m = KERNEL.search(mangled)
    if m is None:
        return None
    if m.group(4):
        return m.group(4), PREPARE[m.group(5)], False
    names = names if names is not None else storage_names()
    return m.group(1), names[int(m.group(2))], m.group(3) == "1"


def min_blocks(storage: str, amsgrad: bool) -> int | None:
    """The resident blocks per SM the update kernel must allow (None: no requirement), as
    min_blocks_per_sm in launch_policy.cuh decides it."""
    if storage.startswith("double"):
        return None
    if "/8bit" in storage:   # a lane holds 8 elements of every moment (kQuantizedBlocksPerSm)
        return 2
    if storage.startswith("half/") and "master" in storage:
        return 3
    return 3 if amsgrad else 4


def ptxas_table(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if entry:
            current = {"kernel": describe(entry.group(1)), "arch": entry.group(2), "stack": "", "registers": None}
            continue
        if current is None:
            continue
        stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if stack:
            current["stack"] = stack.group(0)
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            if current["kernel"] is not None:
                rows.append(current)
            current = None
    return rows


def find_cuobjdump() -> str | None:
    home = os.environ.get("CUDA_HOME")
    candidates = [Path(home) / "bin" / "cuobjdump"] if home else []
    try:
        import triton  # ships cuobjdump with its NVIDIA backend

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("cuobjdump")


def global_stores(sass: str) -> dict[tuple[str, str, bool, str], Counter]:
    """Per (arch, update kernel): counts of each STG width."""
    out, arch, kernel = {}, None, None
    for line in sass.splitlines():
        a = re.search(r"arch = (sm_\d+)", line)
        if a:
            arch = a.group(1)
        f = re.search(r"Function : (\S+)", line)
        if f:
            kernel = describe(f.group(1))
            if kernel is not None and kernel[0] == "update_kernel":
                out[(arch, *kernel[1:])] = Counter()
            continue
        store = re.search(r"\bSTG\.E[.A-Z0-9]*", line)
        if store and kernel is not None and kernel[0] == "update_kernel":
            out[(arch, *kernel[1:])][store.group(0)] += 1
    return out


def store_failures(stores: dict[tuple[str, str, bool], Counter]) -> list[str]:
    """Update kernels whose global stores are not all 16-byte vectors (but the one
    64-bit store of the schedule counter, and with 8-bit moments the 8-byte stores of a
    lane's codes)."""
    failures = []
    for (arch, storage, amsgrad), counts in sorted(stores.items()):
        split = {k: v for k, v in counts.items() if k not in ("STG.E.128", "STG.E.64")}
        if "/8bit" in storage:
            if counts["STG.E.128"] == 0 or counts["STG.E.64"] < 2 or split:
                failures.append(f"{arch} update {storage}{' amsgrad' if amsgrad else ''}: global stores "
                                f"{dict(counts)}; expected STG.E.128 (parameters), STG.E.64 (codes and the "
                                "schedule counter) and nothing else")
            continue
        if counts["STG.E.128"] == 0 or counts["STG.E.64"] > 1 or split:
            failures.append(f"{arch} update {storage}{' amsgrad' if amsgrad else ''}: global stores {dict(counts)}; "
                            "expected only STG.E.128 and one STG.E.64 (the schedule counter)")
    return failures


def spill_failures(log: str, quiet: bool = False) -> list[str]:
    """Spills ptxas warned about: failures in any function but CUDA's slow paths."""
    failures, tolerated = [], set()
    for function, stores in SPILL_WARNING.findall(log):
        if function in SLOW_PATHS:
            tolerated.add(f"{function} ({stores} bytes)")
        else:
            failures.append(f"ptxas spilled registers in {function}: {stores} bytes of spill stores")
    if tolerated and not quiet:
        print(f"  tolerated: spills in CUDA's own slow paths: {', '.join(sorted(tolerated))}")
    return failures


def compile_for_ptxas_report() -> str:
    """ptxas's report for every .cu of csrc/cuda (the launch file and the kernels' units),
    compiled here as setup.py compiles them, for sm_90."""
    import torch
    from torch.utils import cpp_extension

    nvcc = str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    if nvcc is None:
        sys.exit("check_cuda_kernels: no BUILD_LOG given and no nvcc found (set CUDA_HOME or put nvcc on PATH)")
    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:   # torch before 2.6
        includes = cpp_extension.include_paths(cuda=True)
    root = Path(__file__).resolve().parents[1]
    report = []
    for source in sorted((root / "csrc" / "cuda").glob("*.cu")):
        command = [nvcc, "-c", str(source), "-o", os.devnull, "-std=c++20",
                   "-O3", "--fmad=false", "--expt-relaxed-constexpr", "-Xptxas=-v,--warn-on-spills",
                   "-gencode=arch=compute_90,code=sm_90", "-DNOAM_EXT_WITH_CUDA", f"-I{root / 'csrc'}",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                   *(f"-I{p}" for p in includes)]
        print(f"check_cuda_kernels: compiling {source.relative_to(root)} for sm_90", file=sys.stderr)
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"check_cuda_kernels: nvcc failed on {source.name}:\n{run.stderr[-4000:]}")
        report.append(run.stdout + run.stderr)
    return "\n".join(report)


def sass_of(cuobjdump: str, so: str) -> str | None:
    """cuobjdump -sass of the extension, or None (with the reason printed) when it cannot run:
    cuobjdump needs nvdisasm beside it for SASS."""
    run = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True)
    if run.returncode != 0:
        reason = (run.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"  SASS store check skipped: {cuobjdump} -sass failed ({reason}; is nvdisasm installed?)")
        return None
    return run.stdout


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="check_cuda_kernels.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("build_log", nargs="?", type=Path, help="a `pip install -v` log of a CUDA build")
    parser.add_argument("extension_so", nargs="?", help="the built noam_ext._C, for the SASS store check")
    parser.add_argument("--quiet", action="store_true", help="one summary line instead of the ptxas table")
    args = parser.parse_args(argv)
    log = args.build_log.read_text(errors="replace") if args.build_log else compile_for_ptxas_report()
    table = ptxas_table(log)
    if not table:
        return 0
    failures = spill_failures(log, args.quiet)
    lines = ["CUDA kernels (ptxas): registers, spills, stack; resident blocks of 256 threads per SM"]
    for row in table:
        name, storage, amsgrad = row["kernel"]
        kind = f"{name.replace('_kernel', '')} {storage}{' amsgrad' if amsgrad else ''}"
        blocks = REGISTERS_PER_SM // (row["registers"] * THREADS_PER_BLOCK)
        lines.append(f"  {row['arch']:6} {kind:24} {row['registers']:3} registers ({blocks} blocks), {row['stack']}")
        needed = min_blocks(storage, amsgrad) if name == "update_kernel" else None
        if needed is not None and blocks < needed:
            failures.append(f"{row['arch']} {kind}: {row['registers']} registers allow {blocks} blocks per SM, "
                            f"fewer than {needed}")
    if args.quiet:
        print(f"CUDA kernels (ptxas): {len(table)} kernels checked for spills and resident blocks")
    else:
        print("\n".join(lines))
    if args.extension_so:
        cuobjdump = find_cuobjdump()
        sass = None
        if cuobjdump is None:
            print("  SASS store check skipped: no cuobjdump ($CUDA_HOME/bin, triton, PATH)")
        else:
            sass = sass_of(cuobjdump, args.extension_so)
        if sass is not None:
            stores = global_stores(sass)
            store_problems = store_failures(stores)
            if not stores:
                store_problems.append(f"no update kernel found in the SASS of {args.extension_so}")
            failures += store_problems
            if not store_problems:
                print(f"  SASS: every global store of the {len(stores)} update kernels is one 16-byte STG.E.128, "
                      "except the schedule counter's one 64-bit STG.E.64 (and 8-bit moments' codes, 8 bytes a "
                      "lane: STG.E.64)")
    for failure in failures:
        print(f"ERROR: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
