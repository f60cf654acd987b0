"""Benchmark and check reports: printed as JSON and, when asked, written whole (temp file, then rename)."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: Path | None = None, indent: int = 2, quiet: bool = False) -> None:
    text = json.dumps(report, indent=indent)
    if not quiet:
        print(text)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text + "\n")
        tmp.replace(path)
