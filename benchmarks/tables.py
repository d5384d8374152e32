"""Markdown tables: the one format the benchmarks and the demo print their results in, so that a run's output reads
aligned in a terminal and pastes straight into the documentation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The header, the rule and one line per row, each column padded to its widest cell (cells are `str(cell)`)."""
    lines = [[str(cell) for cell in header], *([str(cell) for cell in row] for row in rows)]
    for line in lines[1:]:
        if len(line) != len(header):
            raise ValueError(f"a row of {len(line)} cells under a header of {len(header)}: {line}")
    widths = [max(3, *(len(line[column]) for line in lines)) for column in range(len(header))]
    rule = ["-" * width for width in widths]
    return "\n".join(markdown_row(line, widths) for line in [lines[0], rule, *lines[1:]])


def markdown_row(cells: Sequence[object], widths: Sequence[int] | None = None) -> str:
    """One line of a table; `widths` pads the cells (a row printed as it is measured goes unpadded)."""
    texts = [str(cell) for cell in cells]
    if widths is not None:
        texts = [text.ljust(width) for text, width in zip(texts, widths)]
    return "| " + " | ".join(texts) + " |"
