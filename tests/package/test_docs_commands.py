"""The commands README.md and docs/*.md show, checked: a newcomer copies them, so a command
that names a file that is gone (a renamed script, a demo that moved) must fail here, not on
their machine.

A command is a line of a ```bash (or sh, shell) block, every one of which must be a command
this file understands, or an inline `code` span that starts with one (bash, python, pip,
.venv/bin/..., cd, source, export, after any VAR=value). For each:
  - every file it names (a script, an example, a directory it enters, the project pip
    installs) exists, relative to the repository root, and every module it runs with
    `python -m` is importable;
  - the script or module it runs is either run here with --help (RUN_WITH_HELP: each answers
    it without installing or building anything) or listed in NOT_RUN with the reason.
    scripts/demo.sh is run with --help only where it installs nothing (see its test).
The ```python blocks of README.md are its examples: each runs on its own, in a fresh
interpreter, as a reader would paste it.
README.md is the front door: at most 150 lines, and the two commands, with the choice of
torch they install, within the first 24 lines (one terminal screen)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

# Run here as `<interpreter or bash> PATH --help`: each parses its arguments before it does
# anything, and --help prints the usage and exits 0.
RUN_WITH_HELP = {
    "examples/train_demo.py": "argparse; what scripts/demo.sh runs",
    "examples/schedule_demo.py": "argparse",
    "examples/low_bytes_demo.py": "argparse",
    "examples/fsdp2_eight_bit.py": "argparse; spawns its gloo processes only after parsing",
    "benchmarks/bench_step.py": "argparse",
    "benchmarks/compute_floor.py": "argparse",
    "benchmarks/eight_bit_step.py": "argparse; the 8-bit rows of benchmarks/RESULTS.md",
    "benchmarks/quantization_maps.py": "argparse; the 8-bit map study of docs/eight_bit_state.md",
    "scripts/check_cuda_kernels.py": "argparse (without --help it would compile every .cu)",
    "scripts/audit_symbols.py": "argparse",
}
DEMO_SH = "scripts/demo.sh"   # --help installs nothing once an environment holds a build
NOT_RUN = {
    "scripts/test.sh": "installs torch and the tools, builds noam_ext (twice where CUDA builds) and runs "
                       "this whole suite, this file included; CI runs it (.ci/run)",
    ".ci/run": "CI itself: scripts/test.sh on a fresh clone (see scripts/test.sh)",
    "scripts/sanitize.sh": "builds noam_ext with sanitizers and runs the CPU suite under them (about 15 minutes)",
    "benchmarks/gpu_check.sh": "builds noam_ext for a GPU first and has no --help; it is run on a lent GPU",
    "setup.py": "builds the extension",
    "pip": "installs packages, or builds noam_ext into the environment",
    "-m pytest": "runs the test suite, this file included",
    "source": "changes the environment of the shell that runs it, nothing else",
}
# Made by scripts/env.sh on the first run: not in a fresh clone, so not checked.
MADE_BY_THE_SCRIPTS = ".venv/"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_BLOCKS = {"bash", "sh", "shell"}
INLINE = re.compile(r"`([^`\n]+)`")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
PIPS = {"pip", "pip3", ".venv/bin/pip"}
STARTERS = {"bash", "sh", "cd", "source", "export"} | PYTHONS | PIPS


def shell_lines(text: str) -> list[str]:
    """The lines of the page's shell blocks (continuations joined), comments left out."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL_BLOCKS:
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    lines.append(line.strip())
    return lines


def inline_commands(text: str) -> list[str]:
    """Inline code spans outside code blocks that start with a command."""
    prose = FENCE.sub("", text)
    found = []
    for span in INLINE.findall(prose):
        words = span.split()
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        if len(words) >= 2 and words[0] in STARTERS:
            found.append(span)
    return found


def segments(command: str) -> list[list[str]]:
    """The simple commands of a line (split at &&, ||, ; and |), VAR=value prefixes removed."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    out = []
    for words in parts:
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        out.append(words)
    return out


def analyse(command: str) -> tuple[list[str], list[str]]:
    """(targets, problems) of one command line: what it runs (a repository path, "-m module",
    "pip" or "source"), and what is wrong with it (a missing file, an unknown command)."""
    targets, problems = [], []
    cwd = REPO

    def exists(path: str, what: str, directory: bool = False) -> str | None:
        if path.startswith(MADE_BY_THE_SCRIPTS):
            return None
        full = (cwd / path).resolve()
        ok = full.is_dir() if directory else full.is_file()
        if not ok:
            problems.append(f"{command!r}: {what} {path} does not exist (from {cwd.relative_to(REPO) or '.'})")
            return None
        return full.relative_to(REPO).as_posix()

    for words in segments(command):
        if not words:
            continue
        head, args = words[0], words[1:]
        if head == "export":
            continue
        if head == "cd":
            if exists(args[0] if args else ".", "the directory", directory=True) is not None:
                cwd = (cwd / args[0]).resolve()
        elif head == "source":
            if args:
                exists(args[0], "the file")
            targets.append("source")
        elif head in ("bash", "sh"):
            script = next((a for a in args if not a.startswith("-")), None)
            if script is None:
                problems.append(f"{command!r}: no script to run")
            elif (path := exists(script, "the script")) is not None:
                targets.append(path)
        elif head in PYTHONS or head.endswith(("/python", "/python3")):
            if head not in PYTHONS:
                problems.append(f"{command!r}: run it with python or .venv/bin/python, not {head}")
            elif args[:1] == ["-m"] and len(args) >= 2:
                module = "-m " + args[1]
                if args[1] in PIPS:
                    targets.append("pip")
                else:
                    if importlib.util.find_spec(args[1]) is None:
                        problems.append(f"{command!r}: no module named {args[1]}")
                    targets.append(module)
            elif args[:1] == ["-c"]:
                continue
            elif not args:
                problems.append(f"{command!r}: python with nothing to run")
            elif (path := exists(args[0], "the script")) is not None:
                targets.append(path)
        elif head in PIPS:
            for k, arg in enumerate(args):
                if arg == "." or arg.startswith(("./", "../")):
                    project = exists(arg, "the project", directory=True)
                    if project is not None and not any((REPO / project / f).exists()
                                                       for f in ("setup.py", "pyproject.toml")):
                        problems.append(f"{command!r}: {arg} is not a project pip can install")
            targets.append("pip")
        else:
            problems.append(f"{command!r}: unknown command {head!r} (this file knows {sorted(STARTERS)})")
    return targets, problems


def documented_commands() -> dict[str, list[str]]:
    """Page (relative path) -> its commands: shell-block lines, then inline spans."""
    return {page.relative_to(REPO).as_posix(): shell_lines(page.read_text()) + inline_commands(page.read_text())
            for page in PAGES}


def documented_targets() -> dict[str, list[str]]:
    """What the docs run -> where ("page: command")."""
    where: dict[str, list[str]] = {}
    for page, commands in documented_commands().items():
        for command in commands:
            for target in analyse(command)[0]:
                where.setdefault(target, []).append(f"{page}: {command}")
    return where


def python_env() -> dict[str, str]:
    """The environment of a child interpreter that imports the noam_ext these tests import."""
    spec = importlib.util.find_spec("noam_ext")
    assert spec is not None and spec.submodule_search_locations, "noam_ext is not importable"
    root = str(Path(next(iter(spec.submodule_search_locations))).parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def test_the_pages_show_commands():
    commands = documented_commands()
    assert len(commands["README.md"]) >= 4 and len(commands["docs/development.md"]) >= 10, commands


def test_every_command_names_files_that_exist():
    problems = [problem for commands in documented_commands().values() for command in commands
                for problem in analyse(command)[1]]
    assert not problems, "\n".join(problems)


def test_every_command_is_run_here_or_says_why_not():
    unexplained = {target: where for target, where in documented_targets().items()
                   if target not in RUN_WITH_HELP and target not in NOT_RUN and target != DEMO_SH}
    assert not unexplained, ("commands the docs show that this file neither runs nor lists in NOT_RUN: "
                             f"{unexplained}")


@pytest.mark.parametrize("path", sorted(RUN_WITH_HELP))
def test_each_script_the_docs_name_answers_help(path):
    where = documented_targets()
    assert path in where, f"{path} is no longer in the docs: remove it from RUN_WITH_HELP"
    run = subprocess.run([sys.executable, str(REPO / path), "--help"], cwd=REPO, env=python_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{path} --help: exit {run.returncode}\n{run.stderr[-3000:]}"
    assert "usage" in run.stdout.lower(), run.stdout[-2000:]


def test_demo_sh_help_runs_the_example_it_should():
    """bash scripts/demo.sh --help, with this interpreter's environment as the one the script
    uses, where that answers without installing: a virtual environment whose Python imports
    noam_ext._C from outside the clone (otherwise the script would make or fill one first)."""
    assert DEMO_SH in documented_targets()
    prefix = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (prefix / "bin" / "activate").exists():
        pytest.skip("not running in a virtual environment: scripts/demo.sh --help would make one first")
    built = subprocess.run([str(prefix / "bin" / "python"), "-c", "import noam_ext._C"], cwd="/tmp",
                           capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.skip("noam_ext is not installed in this environment: scripts/demo.sh --help would build it first")
    run = subprocess.run(["bash", str(REPO / DEMO_SH), "--help"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, NOAM_EXT_VENV=sys.prefix), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage" in run.stdout and "--device" in run.stdout, run.stdout[-2000:]
    assert "installing" not in run.stderr and "building noam_ext" not in run.stderr, run.stderr[-2000:]


README_EXAMPLES = [code for lang, code in FENCE.findall(README.read_text()) if lang == "python"]


def test_the_readme_has_its_two_examples():
    assert len(README_EXAMPLES) == 2


@pytest.mark.parametrize("index", range(len(README_EXAMPLES)))
def test_each_readme_example_runs_on_its_own(index, tmp_path):
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(README_EXAMPLES[index])
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=python_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"README.md example {index + 1}:\n{run.stderr[-3000:]}"


def test_the_front_door_fits_a_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines"
    first_screen = lines[:24]
    demo = [k for k, line in enumerate(first_screen) if line.startswith("bash scripts/demo.sh")]
    test = [k for k, line in enumerate(first_screen) if line.startswith("bash scripts/test.sh")]
    assert demo and test, "the two commands must be within README.md's first 24 lines"
    # Which torch the scripts install, and how to choose the CPU-only one, before the commands.
    torch_note = [k for k, line in enumerate(first_screen) if "NOAM_EXT_TORCH" in line]
    assert torch_note and torch_note[0] < min(demo[0], test[0])
