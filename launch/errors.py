"""The one error type of the launcher, so the CLI can print any recipe problem without a traceback."""

from __future__ import annotations

MISSING = object()


class RecipeError(Exception):
    """A recipe problem found before anything starts: names the file, the key and the value to fix."""

    def __init__(self, source: str, key: str, message: str, value: object = MISSING) -> None:
        self.source, self.key, self.value = source, key, value
        shown = "" if value is MISSING else f" = {value!r}"
        super().__init__(f"{source}: {key or '<recipe>'}{shown}: {message}")
