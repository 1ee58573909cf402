"""Loading the scripts under benchmarks/ in their tests: they are files, not package modules."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(path: Path) -> ModuleType:
    """The benchmark script at ``path`` as a module, registered under its stem (dataclasses resolve
    their annotations through sys.modules)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
