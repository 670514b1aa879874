"""Per-class training counts: the one piece of data-set knowledge the optimizers and samplers share.

The JSON file is ``{"class_counts": [n_0, n_1, ...]}``; a bare list and timm's
``{"pos_counts": [...], "num_samples": N}`` (``timm.loss.load_class_stats``) are read too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

CountsLike = Sequence[int] | str | os.PathLike


def load_class_counts(source: CountsLike) -> list[int]:
    """Return per-class counts from a sequence or a JSON file, with errors that name the file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"class counts file '{path}' does not exist; write one with "
                "`ltsam.counts.save_class_counts(counts, path)` or pass a list of per-class counts"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"class counts file '{path}' is not valid JSON: {err}") from err
        if isinstance(data, dict):
            key = next((k for k in ("class_counts", "pos_counts") if k in data), None)
            if key is None:
                raise ValueError(
                    f"class counts file '{path}' has keys {sorted(data)}; expected 'class_counts' "
                    "(or timm's 'pos_counts')"
                )
            data = data[key]
        return _validate(data, origin=f"class counts file '{path}'")
    return _validate(source, origin="class_counts")


def save_class_counts(counts: Sequence[int], path: str | os.PathLike, **extra) -> Path:
    """Write counts (plus optional metadata such as class names) atomically."""
    counts = _validate(counts, origin="class_counts")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"class_counts": counts, "num_samples": sum(counts), **extra}, indent=1))
    os.replace(tmp, path)
    return path


def _validate(counts, origin: str) -> list[int]:
    try:
        values = [int(c) for c in counts]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{origin} must be a list of integers, got {counts!r:.80}") from err
    if not values:
        raise ValueError(f"{origin} is empty; it needs one count per class")
    bad = [i for i, c in enumerate(values) if c < 0 or c != float(counts[i])]
    if bad:
        raise ValueError(f"{origin}: class {bad[0]} has invalid count {counts[bad[0]]!r}; counts are integers >= 0")
    return values
