"""The one YAML loader of the project: trainer configs (``ltsam train -c``), launcher recipes, reproduction
recipes (``tools/reproduce.py``) and the ``args.yaml`` a run writes.

Two things plain ``yaml.safe_load`` gets wrong for configs, fixed once here:

* numbers as people write them (YAML 1.2): ``1e-3`` is a float and ``1:4`` a string (YAML 1.1, which PyYAML
  follows, reads ``1e-3`` as a string and ``1:4`` as the base-60 number 64);
* every key remembers its line, so a bad value or an unknown key is reported as ``file:line: key: problem``;
  a key written twice in one mapping is an error (PyYAML would keep the last silently).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers (see the module docstring)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+|0b[01_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


class YamlError(ValueError):
    """A YAML file that cannot be used as written: ``file:line: key: problem``."""

    def __init__(self, file: str, message: str, line: int | None = None, key: str = "") -> None:
        self.file, self.message, self.line, self.key = file, message, line, key
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")


@dataclass
class YamlDoc:
    """A loaded YAML document and, per dotted key (``a.b``, ``a.list[0]``), the 1-based line it is on."""

    file: str
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def line(self, dotted: str) -> int | None:
        """The key's line, else its closest enclosing key's (a value set under a mapping)."""
        while dotted:
            if dotted in self.lines:
                return self.lines[dotted]
            dotted = dotted.rpartition(".")[0]
        return self.lines.get("")

    def error(self, dotted: str, message: str) -> YamlError:
        return YamlError(self.file, message, self.line(dotted), dotted)

    def get(self, dotted: str, default: Any = None) -> Any:
        node = self.data
        for part in dotted.split(".") if dotted else ():
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def mapping(self, dotted: str = "", what: str = "a mapping") -> dict:
        """The mapping at ``dotted`` (an absent or empty one is ``{}``); anything else is an error."""
        value = self.get(dotted)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(dotted, f"expected {what}, got {type(value).__name__} {value!r:.60}")
        return value

    def check_keys(self, dotted: str, allowed: Iterable[str], what: str = "key",
                   normalize: Callable[[str], str] = str) -> dict:
        """The mapping at ``dotted`` with its keys normalised; a key not in ``allowed`` is an error naming its
        line and the closest allowed key (a typo must not be ignored silently)."""
        allowed = sorted(set(allowed))
        out = {}
        for key, value in self.mapping(dotted).items():
            name = normalize(str(key))
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
                raise self.error(f"{dotted}.{key}" if dotted else str(key), f"unknown {what}; {hint}")
            out[name] = value
        return out


def read(text: str, source: str = "<string>") -> Any:
    """One YAML value from a string (a command-line override, an environment variable), no line bookkeeping."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise YamlError(source, f"not valid YAML: {err}") from None


def parse(text: str, file: str = "<string>") -> YamlDoc:
    """Parse a document; invalid YAML is a YamlError naming the line and column."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(str(p) for p in (err.context, err.problem) if p)
        column = f" (column {mark.column + 1})" if mark else ""
        raise YamlError(file, f"not valid YAML: {problem}{column}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise YamlError(file, f"not valid YAML: {err}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _key_lines(node, "", lines, file)
    return YamlDoc(file, data, lines)


def load(path: str | Path, what: str = "YAML file") -> YamlDoc:
    """Read and parse ``path``; a missing file is a YamlError saying which."""
    file = Path(path)
    if not file.is_file():
        raise YamlError(str(file), f"{what} does not exist")
    return parse(file.read_text(), str(file))


def _key_lines(node: yaml.Node, dotted: str, lines: dict[str, int], file: str) -> None:
    lines[dotted] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{dotted}.{key}" if dotted else key
            if key in seen and key != "<<":
                raise YamlError(file, f"written twice in one mapping (first on line {lines[child]})",
                                key_node.start_mark.line + 1, child)
            seen.add(key)
            _key_lines(value_node, child, lines, file)
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _key_lines(item, f"{dotted}[{index}]", lines, file)
