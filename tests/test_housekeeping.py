"""The package ships its type marker, and the repository tracks no training outputs."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_ships_as_package_data():
    assert (ROOT / "debias" / "py.typed").is_file()
    # read without tomllib, which needs Python 3.11
    found = re.search(r"\[tool\.setuptools\.package-data\]\s*debias = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text())
    assert found is not None and '"py.typed"' in found.group(1)


def test_no_checkpoint_is_tracked_and_checkpoints_are_ignored():
    tracked = subprocess.run(["git", "ls-files", "*.ckpt"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert tracked.stdout.strip() == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", "checkpoints/epoch=0-step=30.ckpt"], cwd=ROOT)
    assert ignored.returncode == 0
