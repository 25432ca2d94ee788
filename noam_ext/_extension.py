"""Loads the compiled ops (noam_ext._C) and says what the build contains."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.noam_ext.*)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "noam_ext's compiled extension (noam_ext._C) could not be loaded. Build it against the "
        "torch you run with: pip install --no-build-isolation . (see README.md). "
        f"Original error: {error}"
    ) from error

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
