"""What every benchmark shares: writing its table where the book's benchmark page reads it."""

from __future__ import annotations

import csv
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "book" / "figures"


def write_table(rows: list[dict], name: str, folder: Path = FIGURES) -> Path:
    """Write ``rows`` (dicts with the same keys) to ``<folder>/<name>`` as CSV.

    ``folder`` is ``book/figures`` unless a quick development run writes elsewhere.
    """
    if not rows:
        raise ValueError(f"no rows to write to {name}")
    out = Path(folder) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out
