import pytest
import torch

import noam_ext


def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is present on this machine"
    if not noam_ext.build_info()["cuda_compiled"]:
        return "this build of noam_ext has no CUDA implementation (NOAM_EXT_NO_CUDA or CPU-only torch)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"CUDA test skipped: {reason}"))
