"""How often each class should be drawn: the arithmetic shared by map-style and streaming samplers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("instance", "sqrt", "balanced", "progressive")


def class_probabilities(counts: Sequence[int], mode: str, progress: float = 0.0) -> np.ndarray:
    """Probability that one draw picks each class.

    ``instance``: n_c / N (plain shuffling); ``sqrt``: sqrt(n_c) normalised; ``balanced``: uniform over
    classes that have samples; ``progressive``: (1 - t) * instance + t * balanced with t = ``progress``
    in [0, 1] (Kang et al., 2020). Classes with no sample always get probability 0.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 0).any() or n.sum() <= 0:
        raise ValueError(
            f"counts must be a non-empty list of non-negative numbers with a positive sum, got {counts!r:.80}"
        )
    present = (n > 0).astype(np.float64)
    instance = n / n.sum()
    balanced = present / present.sum()
    if mode == "instance":
        return instance
    if mode == "sqrt":
        root = np.sqrt(n)
        return root / root.sum()
    if mode == "balanced":
        return balanced
    if mode == "progressive":
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        return (1.0 - progress) * instance + progress * balanced
    raise ValueError(f"unknown sampling mode '{mode}'; choose one of {', '.join(MODES)}")


def repeat_factors(counts: Sequence[int], threshold: float) -> np.ndarray:
    """Repeat-factor sampling (Gupta et al., LVIS 2019): r_c = max(1, sqrt(t / f_c)), f_c = n_c / N.

    Each image of class c is repeated r_c times per epoch on average (floor plus a Bernoulli remainder).
    """
    n = np.asarray(counts, dtype=np.float64)
    if threshold <= 0:
        raise ValueError(f"repeat-factor threshold must be > 0, got {threshold}")
    freq = n / n.sum()
    with np.errstate(divide="ignore"):
        factors = np.sqrt(threshold / freq)
    return np.where(n > 0, np.maximum(1.0, factors), 0.0)
