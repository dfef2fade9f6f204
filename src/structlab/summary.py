"""The end-of-run summary: one table a person reads, and summary.json for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_summary(
    summary: dict[str, Any],
    output_dir: str | Path,
    console: Console | None = None,
    details: dict | None = None,
) -> Path:
    """Print `summary` (sections of key → value) as a table and save it, with `details` (too long to
    print: the per-layer table, say), as summary.json."""
    table = Table(title=f"structlab run: {summary.get('run', {}).get('name', '')}", show_lines=False)
    table.add_column("", style="bold cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for section, rows in summary.items():
        table.add_row(f"[magenta]{section}", "")
        for key, value in rows.items():
            table.add_row(f"  {key}", _fmt(value))
    (console or Console()).print(table)
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps({**summary, **(details or {})}, indent=2, default=str))
    return path
