"""Plain-text tables for the terminal."""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"^[+-]?(?=\.?\d)(\d[\d,]*)?(\.\d+)?(e[+-]?\d+)?(%|x|s)?$")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers (cells starting with a digit or sign) right-aligned.

    >>> print(format_table(["a", "n"], [["x", "1"], ["yy", "10"]]))
    a    n
    --  --
    x    1
    yy  10
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def numeric(cell: str) -> bool:
        return _NUMBER.match(cell) is not None

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        return "  ".join(parts).rstrip()

    numeric_columns = [all(numeric(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]
    header = "  ".join(
        h.rjust(w) if n else h.ljust(w) for h, w, n in zip(headers, widths, numeric_columns, strict=True)
    )
    return "\n".join([header.rstrip(), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
