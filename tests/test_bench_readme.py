"""The README's speed table is generated from bench/RESULTS.md, never typed by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _results import read_block, table_rows, write_block  # noqa: E402


def test_readme_speed_table_is_current() -> None:
    script = os.path.join(ROOT, "bench", "readme_speed.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_write_block_replaces_only_its_block(tmp_path) -> None:
    path = str(tmp_path / "R.md")
    write_block(path, "a", "first", title="Results")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n## Notes by hand\n")
    write_block(path, "b", "| x | y |\n|---|---|\n| 1 | 2 |")
    write_block(path, "a", "second")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("# Results\n")
    assert read_block(path, "a") == "second"
    assert "first" not in text
    assert "## Notes by hand" in text
    assert table_rows(read_block(path, "b")) == [{"x": "1", "y": "2"}]
    assert not os.path.exists(path + ".partial")


def test_missing_block_is_an_error(tmp_path) -> None:
    path = tmp_path / "R.md"
    path.write_text("no block\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected one block"):
        read_block(str(path), "suite")
