"""The environment scripts/ensure_venv.sh makes: its interpreters write the bytecode of what
they import, on first import, even under PYTHONDONTWRITEBYTECODE (uv installs without
compiling; see README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = "_fedtune_bytecode.pth"


def _import_writes_bytecode(tmp_path: Path, *flags: str) -> bool:
    """Whether importing a new module, with PYTHONDONTWRITEBYTECODE set, writes its .pyc."""
    folder = tmp_path / ("".join(flags).strip("-") or "plain")
    folder.mkdir(parents=True)
    (folder / "fresh_module.py").write_text("VALUE = 1\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, *flags, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "import fresh_module", str(folder)], env=env, check=True)
    return any((folder / "__pycache__").glob("fresh_module.*.pyc"))


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="runs in the .venv that scripts/ensure_venv.sh makes")
def test_the_venv_writes_bytecode_on_first_import_despite_pythondontwritebytecode(tmp_path):
    import sysconfig

    assert (Path(sysconfig.get_paths()["purelib"]) / PTH).is_file()
    assert _import_writes_bytecode(tmp_path)
    # without site (-S) the .pth file is not read: the variable is obeyed, nothing written
    assert not _import_writes_bytecode(tmp_path, "-S")
