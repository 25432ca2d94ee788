"""A test module of another folder, for the tests that reuse its cases (the GPU tests run
the CPU parity and host-run cases on the card): loaded once by its path under tests/."""

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load(relative_path: str):
    name = "sibling_" + relative_path.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
