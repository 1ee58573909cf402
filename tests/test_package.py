"""The package's public surface: lazy exports, and a CLI that loads torch only for commands needing it."""

import subprocess
import sys

import pytest

import xal_engine


def test_lazy_exports_are_the_library_functions():
    from xal_engine import ops
    from xal_engine.core import scoring
    from xal_engine.ops import reference

    assert xal_engine.gradcam_dice is ops.gradcam_dice
    assert xal_engine.score_batch is scoring.score_batch
    assert xal_engine.RoiAgreement is reference.RoiAgreement
    with pytest.raises(AttributeError, match="no_such_name"):
        xal_engine.no_such_name  # noqa: B018


def test_light_commands_do_not_import_torch():
    code = ("import sys; from xal_engine.cli import main; rc = main(['pool', '--help']); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "False"]


def test_unknown_command_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "xal_engine", "nonsense"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "invalid choice" in out.stderr


def test_every_subpackage_is_installed():
    from pathlib import Path

    import tomllib

    root = Path(xal_engine.__file__).parent
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"xal_engine." + ".".join(p.parent.relative_to(root).parts) if p.parent != root else "xal_engine"
             for p in root.rglob("__init__.py")}
    assert found | {"xal_engine.kernels"} == listed
