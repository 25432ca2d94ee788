"""Fails when one function is defined in two objects of the extension with different code.

    python scripts/audit_symbols.py [OBJECTS_DIR]     (default: build/objects)

setup.py keeps the objects it linked into noam_ext._C in build/objects/, with a
manifest.json saying how each was compiled: by nvcc (the .cu's host code) or the C++
compiler, and for which instruction set (the AVX2 and AVX-512 element loops). An
inline function or a template instantiation is a weak symbol: every object that uses
it holds a copy, and the linker keeps one of them, whichever comes first on the link
line, for the whole .so. That is harmless only when the copies do the same thing. It
is not when a header is compiled under different macros (the CUDA kernels' header in
the .cu and in a host run of it: the CUDA op then launched host functions) or for
different instruction sets (an AVX-512 copy of an inline function chosen for the
baseline path: SIGILL on an older CPU). So the audit fails on a function defined in
two objects compiled differently (nvcc vs C++, one instruction set vs another) with
different code, when

  - it is noam_ext's own (its demangled name mentions noam_ext::), or
  - one of the objects was compiled for an instruction set of its own (any library's
    function: setup.py renames those objects' copies, so none should be left).

Copies that differ between objects compiled the same way (the same source and flags,
different inlining) are counted and listed with --verbose: the linker's pick is correct
either way. A manifest-less folder is audited as one C++ compilation.

Code is compared as objdump disassembles it, with addresses, local label numbers and
section offsets left out, relocations (what a call or load refers to) kept.
Exit status: 0 clean, 1 a clash found, 2 no objects to audit.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_TYPES = {"T", "W", "i"}   # nm: global text, weak text, indirect function

HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")
INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\t(.*)$")
RELOCATION = re.compile(r"^\s*[0-9a-f]+: (R_\S+)\s+(.*)$")
TARGET = re.compile(r"\b[0-9a-f]+ <([^>]*)>")          # "call 1a <foo+0x3>" -> "<foo+0x3>"
LOCAL_LABEL = re.compile(r"\.L[A-Za-z_]*\d+")          # .LC12, .LFB3 -> .L#
SECTION_OFFSET = re.compile(r"(\.(?:text|rodata|data|bss)[\w.$]*)[+-]0x[0-9a-f]+")


def functions_defined(obj: Path) -> set[str]:
    out = subprocess.run(["nm", "--defined-only", "-P", str(obj)], capture_output=True, text=True, check=True).stdout
    return {parts[0] for parts in (line.split() for line in out.splitlines()) if len(parts) >= 2
            and parts[1] in FUNCTION_TYPES}


def normalized_bodies(obj: Path, wanted: set[str]) -> dict[str, str]:
    """The wanted functions' code, as comparable text."""
    out = subprocess.run(["objdump", "-d", "-r", "-w", "--no-show-raw-insn", str(obj)], capture_output=True,
                         text=True, check=True).stdout
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        header = HEADER.match(line)
        if header:
            current = bodies.setdefault(header.group(1), []) if header.group(1) in wanted else None
            continue
        if current is None:
            continue
        reloc = RELOCATION.match(line)
        if reloc:
            target = SECTION_OFFSET.sub(r"\1+?", LOCAL_LABEL.sub(".L#", reloc.group(2)))
            current.append(f"  {reloc.group(1)} {target}")
            continue
        insn = INSTRUCTION.match(line)
        if insn:
            text = TARGET.sub(r"<\1>", insn.group(1).split("#")[0].rstrip())
            current.append(LOCAL_LABEL.sub(".L#", text))
    return {name: "\n".join(lines) for name, lines in bodies.items()}


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def load_manifest(objects_dir: Path) -> dict[Path, tuple[str, str | None]]:
    """Each object: (its compiler, the instruction set it was compiled for or None)."""
    manifest = objects_dir / "manifest.json"
    if manifest.exists():
        return {objects_dir / o["path"]: (o.get("compiler", "c++"), o.get("isa"))
                for o in json.loads(manifest.read_text())["objects"]}
    return {p: ("c++", None) for p in sorted(objects_dir.rglob("*.o"))}


def label(obj: Path, how: tuple[str, str | None]) -> str:
    compiler, isa = how
    return obj.name + (f" [{isa}]" if isa else f" [{compiler}]" if compiler != "c++" else "")


def weak_vtables(obj: Path) -> list[str]:
    """Weak vtables an object defines: one chosen from an instruction-set object would send
    baseline callers to that object's (renamed, wider) copies of the virtual functions."""
    out = subprocess.run(["nm", "--defined-only", "-P", str(obj)], capture_output=True, text=True, check=True).stdout
    return [parts[0] for parts in (line.split() for line in out.splitlines())
            if len(parts) >= 2 and parts[1] in {"V", "u"} and parts[0].startswith("_ZTV")]


def audit(objects: dict[Path, tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """(clashes that fail, differences tolerated: the same compilation, or another library's code)."""
    defined = {obj: functions_defined(obj) for obj in objects}
    where: dict[str, list[Path]] = defaultdict(list)
    for obj, names in defined.items():
        for name in names:
            where[name].append(obj)
    shared = {name: objs for name, objs in where.items() if len(objs) > 1}
    bodies = {obj: normalized_bodies(obj, {n for n in defined[obj] if n in shared}) for obj in objects}
    names = demangle(sorted(shared))
    failing, tolerated = [], []
    for name, objs in sorted(shared.items()):
        variants = defaultdict(list)
        for obj in objs:
            variants[bodies[obj].get(name, "")].append(obj)
        if len(variants) < 2:
            continue
        # Different code in differently compiled objects: a copy of one compilation may serve the other's callers.
        across = any(objects[a] != objects[b] for a in objs for b in objs
                     if bodies[a].get(name) != bodies[b].get(name))
        isa_involved = any(objects[o][1] for o in objs)
        ours = "noam_ext::" in names[name]
        groups = "; ".join(" = ".join(label(o, objects[o]) for o in group) for group in variants.values())
        line = f"{names[name]}\n      {len(variants)} different copies: {groups}"
        (failing if across and (ours or isa_involved) else tolerated).append(line)
    for obj, (_, isa) in objects.items():
        if isa:
            names = demangle(weak_vtables(obj))
            failing += [f"{names[v]}\n      a weak vtable in {label(obj, objects[obj])}" for v in names]
    return failing, tolerated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objects_dir", nargs="?", type=Path, default=ROOT / "build" / "objects")
    parser.add_argument("--verbose", action="store_true", help="list the tolerated differences too")
    args = parser.parse_args(argv)
    objects = load_manifest(args.objects_dir) if args.objects_dir.is_dir() else {}
    if not objects:
        print(f"audit_symbols: no objects in {args.objects_dir} (setup.py keeps them there after a build)",
              file=sys.stderr)
        return 2
    for tool in ("nm", "objdump"):
        if not shutil.which(tool):
            print(f"audit_symbols: {tool} not found (binutils)", file=sys.stderr)
            return 2
    failing, tolerated = audit(objects)
    print(f"audit_symbols: {len(objects)} objects; {len(failing)} functions with clashing copies; "
          f"{len(tolerated)} tolerated differences (the same compilation, or another library's baseline code)")
    for line in failing:
        print(f"  CLASH {line}")
    if args.verbose:
        for line in tolerated:
            print(f"  tolerated {line}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
