"""Loads the compiled ops (noam_ext._C) and says what the build contains."""

from __future__ import annotations

import torch

def _source_checkout_hint() -> str:
    """When this package is a source checkout (no compiled _C next to it), say so:
    Python imports the folder in the current directory before an installed build."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").exists() and not any(here.glob("_C*.so")):
        return (f" Python imported noam_ext from the source folder {here}, which has no compiled "
                "extension: this clone was not built in place (scripts/test.sh and scripts/demo.sh do it, "
                "into .venv), or the current directory shadows a copy installed elsewhere. Build it in "
                "place from the repository root: pip install --no-build-isolation -e . (see docs/development.md).")
    return (" Build it against the torch you run with: pip install --no-build-isolation . "
            "(see docs/development.md).")


try:
    from . import _C  # noqa: F401  (importing registers torch.ops.noam_ext.*)
except ImportError as error:  # pragma: no cover - exercised in a subprocess by tests/package/test_extension.py
    raise ImportError("noam_ext's compiled extension (noam_ext._C) could not be loaded." + _source_checkout_hint()
                      + f" Original error: {error}") from error

from . import _ops  # noqa: E402,F401  (fake implementations for torch.compile)


def cpu_capability() -> str:
    """Instruction set the CPU op runs with: 'default', 'avx2' or 'avx512'."""
    return _C.cpu_capability()


def build_info() -> dict:
    """What this build of the extension contains."""
    return {
        "torch": torch.__version__,
        "cuda_compiled": bool(_C.cuda_compiled),
        "cpu_capabilities_compiled": _C.compiled_cpu_capabilities.split(","),
        "cpu_op_parallel": bool(_C.cpu_op_parallel),
        "cpu_capability": cpu_capability(),
    }
