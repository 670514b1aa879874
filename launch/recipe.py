"""Load a recipe: read YAML, resolve `base` includes, interpolate `${VAR}`, apply command-line overrides.

Every key remembers which file and line (or the command line) set it, so a later validation error can name
the line a user has to edit, not just the top-level recipe. YAML is read by the project's one loader,
``ltsam_common.yamlio`` (torch-free).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltsam_common import yamlio
from ltsam_launch.errors import MISSING, RecipeError

COMMAND_LINE = "command line"
# `${NAME}` or `${NAME:-default}`; `$${...}` is an escape that leaves a literal `${...}` (for SLURM scripts)
_VAR = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def read_yaml(text: str) -> Any:
    """One YAML value, read as a recipe file's values are (``1e-3`` a float, ``1:4`` a string)."""
    return yamlio.read(text)


@dataclass
class Recipe:
    """A fully merged recipe plus, for every dotted key, where it was set (``file:line`` or the command line)."""

    path: Path
    data: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def source(self, dotted: str) -> str:
        """The file that set `dotted`, else one that set something below or above it, else the recipe."""
        if dotted in self.origins:
            return self.origins[dotted]
        below = [src for key, src in self.origins.items() if key.startswith(dotted + ".")]
        if below:
            return below[-1]
        parts = dotted.split(".")
        for end in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:end]) in self.origins:
                return self.origins[".".join(parts[:end])]
        return str(self.path)

    def error(self, dotted: str, message: str, value: Any = MISSING) -> RecipeError:
        """A RecipeError for `dotted`, showing its current value unless another is given."""
        if value is MISSING:
            value = self.get(dotted, MISSING)
        return RecipeError(self.source(dotted), dotted, message, value)

    @property
    def name(self) -> str:
        return str(self.data.get("name") or self.path.stem)


def load(path: str | Path, overrides: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> Recipe:
    """Read `path` with its bases, interpolate from `environ` (default os.environ), then apply overrides."""
    env = os.environ if environ is None else environ
    data, origins = _read(Path(path), env, ())
    recipe = Recipe(Path(path), data, origins)
    for override in overrides:
        _apply_override(recipe, override, env)
    return recipe


def _read(path: Path, env: Mapping[str, str], stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise RecipeError(str(stack[-1]), "base", f"include cycle: {chain}", str(path))
    if not path.is_file():
        raise RecipeError(str(stack[-1]) if stack else str(path), "base" if stack else "",
                          "recipe file not found", str(path))
    try:
        doc = yamlio.load(path, "recipe file")
    except yamlio.YamlError as exc:
        raise RecipeError(_where(exc.file, exc.line), exc.key, exc.message) from None
    raw = doc.data or {}
    if not isinstance(raw, dict):
        raise RecipeError(str(path), "", "a recipe must be a mapping of keys", type(raw).__name__)
    bases = raw.pop("base", None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is not None and not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise RecipeError(_where(str(path), doc.line("base")), "base", "expected a file name or a list of file names",
                          bases)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for base in bases or []:
        base_data, base_origins = _read(path.parent / base, env, (*stack, resolved))
        _merge(data, origins, base_data, base_origins, "")
    own = _interpolate(raw, env, str(path), "", doc)
    _merge(data, origins, own, _key_origins(own, doc, ""), "")
    return data, origins


def _where(file: str, line: int | None) -> str:
    return f"{file}:{line}" if line else file


def _key_origins(node: Any, doc: yamlio.YamlDoc, prefix: str) -> dict[str, str]:
    """``file:line`` of every key under ``node``, mappings included (an error about a section names its line)."""
    out: dict[str, str] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        out[dotted] = _where(doc.file, doc.line(dotted))
        if isinstance(value, dict):
            out.update(_key_origins(value, doc, dotted + "."))
    return out


def _merge(dst: dict[str, Any], dst_origins: dict[str, str], src: dict[str, Any], src_origins: dict[str, str],
           prefix: str) -> None:
    """Deep-merge src into dst: mappings merge key by key, anything else replaces (and forgets old origins)."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], dst_origins, value, src_origins, dotted + ".")
            continue
        for old in [k for k in dst_origins if k == dotted or k.startswith(dotted + ".")]:
            del dst_origins[old]
        dst[key] = value
        dst_origins.update({k: v for k, v in src_origins.items() if k == dotted or k.startswith(dotted + ".")})


def interpolate(doc: yamlio.YamlDoc, environ: Mapping[str, str] | None = None) -> Any:
    """A loaded document's data with `${VAR}` / `${VAR:-default}` read from `environ` (default os.environ)."""
    return _interpolate(doc.data, os.environ if environ is None else environ, doc.file, "", doc)


def _interpolate(node: Any, env: Mapping[str, str], source: str, dotted: str,
                 doc: yamlio.YamlDoc | None = None) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string leaves; a value that is one whole `${...}` is re-read
    as a YAML scalar, so `nproc_per_node: ${GPUS:-8}` stays an int."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env, source, f"{dotted}.{k}" if dotted else str(k), doc) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, source, f"{dotted}[{i}]", doc) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise RecipeError(_where(source, doc and doc.line(dotted)), dotted,
                          f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)", node)

    whole = _VAR.fullmatch(node)
    text = _VAR.sub(substitute, node)
    return _scalar(text) if whole and not whole.group(1) else text


def _scalar(text: str) -> Any:
    """YAML's reading of a command-line or environment value: `8` -> 8, `true` -> True, `a b` -> 'a b'."""
    try:
        return read_yaml(text) if text.strip() else text
    except yamlio.YamlError:  # not YAML: the text itself
        return text


def _apply_override(recipe: Recipe, override: str, env: Mapping[str, str]) -> None:
    """`a.b=value` sets (value read as YAML, then interpolated like a file's), `~a.b` deletes."""
    delete = override.startswith("~")
    dotted, eq, value = override[1:].partition("=") if delete else override.partition("=")
    if not dotted or (delete == bool(eq)):
        raise RecipeError(COMMAND_LINE, override, "expected dotted.key=value or ~dotted.key")
    *parents, leaf = dotted.split(".")
    node = recipe.data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            if delete:
                return
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(COMMAND_LINE, ".".join(parents[: i + 1]), "is not a mapping, cannot set a key in it",
                              child)
        node = child
    for old in [k for k in recipe.origins if k == dotted or k.startswith(dotted + ".")]:
        del recipe.origins[old]
    if delete:
        node.pop(leaf, None)
        return
    node[leaf] = _interpolate(_scalar(value), env, COMMAND_LINE, dotted)
    recipe.origins[dotted] = COMMAND_LINE
