"""pytest plugin for timm's own ``tests/test_optim.py`` with ltsam registered: the one list of what cannot pass.

Loaded by ``tests/test_timm_optim_suite.py`` (``-p timm_optim_suite``) in timm's source tree. It keeps only the
registry-parametrised items of ltsam's optimizers and turns each item this table names into an expected failure
that must raise the named error with the named message (one that tells the user what to pass); anything else
must pass. An item in the table that passes, or fails otherwise, fails the run.
"""

from __future__ import annotations

import fnmatch
import re

import pytest

from ltsam_common.names import SAM_METHODS

CLASS_AWARE = tuple(m for m in SAM_METHODS if m != "sam")

_NO_CLOSURE = ("the test sets p.grad and calls step() without a closure: a SAM step needs the loss at w + eps, "
               "so without a closure there is no SAM update to take (stepping the base optimizer on p.grad would "
               "silently be plain SGD); the error names the closure forms and first_step()/second_step()")

# (test function pattern, methods, exception, message pattern, reason)
EXPECTED_FAILURES: list[tuple[str, tuple[str, ...], type[BaseException], str, str]] = [
    ("test_optimizer_no_grad_step", ("sam",), RuntimeError, r"needs a closure .* first_step\(\)", _NO_CLOSURE),
    ("test_optimizer_copy", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_param_group_independent", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_zero_lr", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_tensor_lr", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_resume", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_low_precision", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optimizer_grad_unchanged", ("sam",), RuntimeError, r"needs a closure", _NO_CLOSURE),
    ("test_optim_factory_common_kwargs", ("sam",), KeyError, r"beta1",
     "the test expects an optimizer that takes betas to keep them in its param groups; the SAM family hands "
     "eps/betas/momentum to its base optimizer when the base takes them, and the default base (sgd) takes no "
     "betas (with base='adamw' they are in the groups: tests/test_optim_api.py); one registry record serves every "
     "base, and has_betas=False would make timm's factory drop betas for base='adamw' too"),
    ("*", CLASS_AWARE, ValueError, r"needs class_counts: a list of per-class training counts",
     "imbsam, ssesam and focalsam weight each sample by its class: they need class_counts, which timm's tests "
     "do not pass (and per-sample losses with the batch's targets, which timm's closures do not give)"),
]


def _method(item: pytest.Item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in params.values():
        name = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else value
        if isinstance(name, str) and name in SAM_METHODS:
            return name
    return None


def _expected(item: pytest.Item) -> tuple[type[BaseException], str, str] | None:
    method = _method(item)
    for pattern, methods, error, message, reason in EXPECTED_FAILURES:
        if method in methods and fnmatch.fnmatch(item.originalname, pattern):
            return error, message, reason
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ltsam's registry-parametrised items only (the others are timm's business)."""
    keep = [item for item in items if _method(item) is not None]
    config.hook.pytest_deselected(items=[item for item in items if _method(item) is None])
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    outcome = yield
    expected = _expected(item)
    if expected is None:
        return
    error, message, reason = expected
    excinfo = outcome.excinfo
    if excinfo is not None and issubclass(excinfo[0], pytest.skip.Exception):
        return  # timm's own skip (e.g. no foreach implementation) comes first
    if excinfo is None:
        outcome.force_exception(AssertionError(f"{item.nodeid} passed: remove it from EXPECTED_FAILURES"))
    elif not (issubclass(excinfo[0], error) and re.search(message, str(excinfo[1]))):
        outcome.force_exception(AssertionError(
            f"{item.nodeid} failed with {excinfo[0].__name__}: {excinfo[1]}; expected {error.__name__} "
            f"matching {message!r}"))
    else:
        outcome.force_exception(pytest.xfail.Exception(reason))
