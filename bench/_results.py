"""Generated blocks in Markdown files: ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``.

The benchmark scripts write what they measured into a named block of ``bench/RESULTS.md``
and leave the rest of the file (the notes written by hand) as it is; ``bench/readme_speed.py``
renders the README's speed tables from those blocks the same way. Standard library only, so
that the check in the tests needs no model.
"""

from __future__ import annotations

import os
import re

__all__ = ["read_block", "table_rows", "write_block"]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_block(path: str, name: str) -> str:
    """Return the text between the markers of block ``name`` in ``path`` (without them).

    Raises:
        ValueError: the file has no such block, or its markers are out of order.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    begin, end = _markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path}: expected one block {begin} ... {end}")
    return text[text.index(begin) + len(begin) : text.index(end)].strip("\n")


def write_block(path: str, name: str, content: str, *, title: str | None = None) -> None:
    """Replace block ``name`` of ``path`` by ``content``, atomically; the rest is kept.

    A file or a block that does not exist yet is created (the block at the end, after
    ``title`` for a new file).
    """
    begin, end = _markers(name)
    block = f"{begin}\n{content.strip(chr(10))}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    if begin in text and end in text:
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        head = text.rstrip("\n") or (f"# {title}" if title else "")
        text = f"{head}\n\n{block}\n" if head else f"{block}\n"
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)


def table_rows(block: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table in ``block``, as ``{column header: cell}``."""
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    header = cells(lines[0])
    return [dict(zip(header, cells(line), strict=False)) for line in lines[2:]]
