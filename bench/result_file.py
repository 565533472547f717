"""The JSON result file every benchmark script writes (bench/results/<script>.json by default)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(out: str | Path, result: dict[str, Any]) -> Path:
    """Write `result` as indented JSON to `out` (creating its directory), say so on stdout, return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out
