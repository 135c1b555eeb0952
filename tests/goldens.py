"""Golden values of the KD loss tests: float64-reference results kept in JSON, regenerated on purpose only
(``python tests/test_<module>.py --regen``), never by a test run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def regenerate(path: Path, cases: Mapping[str, Any]) -> None:
    """Write ``cases`` (case name -> value, or -> term -> value) into the golden file ``path``, keeping
    its other cases."""

    def plain(values: Any) -> Any:
        return {term: float(v) for term, v in values.items()} if isinstance(values, Mapping) else float(values)

    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update({name: plain(values) for name, values in cases.items()})
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
