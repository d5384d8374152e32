"""One table formatter for everything the benchmarks and the demo print: a Markdown table (it reads as text in a
terminal and pastes into docs/ as it is)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """`header` and `rows` (cells already formatted, or anything `str()` shows) as Markdown lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
