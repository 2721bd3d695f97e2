"""A results table as data: written once as Markdown (for people, the README) and as JSON
(for ``rbp report``, which renders the data instead of parsing the Markdown back).

``write_table(run_dir / "table1", table)`` writes ``table1.md`` and ``table1.table.json``;
the report shows the JSON one and leaves the Markdown twin out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbp.data.atomic import atomic_write
from rbp.runner.results import write_json

__all__ = ["TABLE_SUFFIX", "Table", "read_table", "write_table"]

#: Suffix of the data file of a table.
TABLE_SUFFIX = ".table.json"
_ALIGN = {"": "---", "left": ":---", "right": "---:", "center": ":---:"}


@dataclass
class Table:
    """``rows`` of cells under ``columns``; ``align`` per column (``left``, ``right``,
    ``center`` or ``""``); ``title`` above and ``notes`` (a paragraph) below it."""

    columns: list[str]
    rows: list[list[Any]]
    title: str = ""
    align: list[str] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        width = len(self.columns)
        for i, row in enumerate(self.rows):
            if len(row) != width:
                raise ValueError(f"table {self.title!r}: row {i} has {len(row)} cells, "
                                 f"the header {width}")
        bad = [a for a in self.align if a not in _ALIGN]
        if bad or len(self.align) > width:
            raise ValueError(f"table {self.title!r}: align must list at most {width} of "
                             f"{sorted(_ALIGN)}, got {self.align}")

    def to_markdown(self) -> str:
        """The table as a Markdown pipe table (title as a heading, notes as a paragraph)."""
        def line(cells: list[Any]) -> str:
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        align = [*self.align, *[""] * (len(self.columns) - len(self.align))]
        parts = [f"# {self.title}\n"] if self.title else []
        parts += [line(self.columns), "|" + "|".join(_ALIGN[a] for a in align) + "|",
                  *(line(r) for r in self.rows)]
        if self.notes:
            parts += ["", self.notes]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "align": self.align, "notes": self.notes}


def write_table(stem: Path, table: Table) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.table.json``; return both paths."""
    stem = Path(stem)
    if stem.suffix == ".md":
        stem = stem.with_suffix("")
    md, data = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + TABLE_SUFFIX)
    with atomic_write(md) as f:
        f.write(table.to_markdown().encode("utf-8"))
    write_json(data, table.to_dict())
    return md, data


def read_table(path: Path) -> Table:
    """The :class:`Table` stored in ``path``; ValueError (naming the file) when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Table(columns=[str(c) for c in doc["columns"]],
                     rows=[list(r) for r in doc["rows"]], title=str(doc.get("title") or ""),
                     align=[str(a) for a in doc.get("align") or []],
                     notes=str(doc.get("notes") or ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a table file ({type(exc).__name__}: {exc})") from exc
