"""Terminal output shared by `search` and the demo: a ranked table of hits."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def format_hits(hits: list) -> str:
    """A ranked table: rank, final score, per-stage scores, id and text."""
    if not hits:
        return "(no hits)"
    # As wide as the longest id: a folder's ids are paths inside it, and a wider one would push its text out of line.
    width = max(14, *(len(hit.id) for hit in hits))
    lines = [f"{'#':>3}  {'score':>7}  {'vector':>7}  {'bm25':>7}  {'id':<{width}}  text"]
    for rank, hit in enumerate(hits, start=1):
        vector = hit.scores.get("vector")
        bm25 = hit.scores.get("bm25")
        # One row per hit: a text of several lines (a CSV cell, a description) printed as it is would put its
        # later lines in rows of their own, read as hits without a rank.
        text = " ".join(hit.text.split())
        lines.append(f"{rank:>3}  {hit.score:7.3f}  {_fmt(vector):>7}  {_fmt(bm25):>7}  {hit.id:<{width}}  {text}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def command_name() -> str:
    """How the user can run this command again: `clip-sidecar` when that name is on PATH and is
    this program, else the path they ran (e.g. `.venv/bin/clip-sidecar` without an activated venv)."""
    invoked = Path(sys.argv[0])
    if invoked.name == "__main__.py":  # python -m sidecar.cli
        return f"{_relative(Path(sys.executable))} -m sidecar.cli"
    found = shutil.which(invoked.name)
    if found is not None and Path(found).resolve() == invoked.resolve():
        return invoked.name
    return _relative(invoked)


def _relative(path: Path) -> str:
    # Not resolved: a venv's python is a symlink, and its own path is the one that works.
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
