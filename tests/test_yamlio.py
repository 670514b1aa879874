"""The one YAML loader (ltsam_common.yamlio): numbers, line numbers, and errors naming file, line and key."""

from __future__ import annotations

import pytest

from ltsam_common.yamlio import YamlError, load, parse


def test_numbers_are_read_as_written_and_keys_know_their_lines():
    doc = parse("a:\n  lr: 1e-3\n  nnodes: 1:4\n  list:\n    - 5\n    - x\n", "f.yaml")
    assert doc.data == {"a": {"lr": 0.001, "nnodes": "1:4", "list": [5, "x"]}}
    assert (doc.line("a"), doc.line("a.lr"), doc.line("a.nnodes"), doc.line("a.list[1]")) == (1, 2, 3, 6)
    assert doc.line("a.lr.deeper") == 2  # a key below a scalar: the closest enclosing key


def test_invalid_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(YamlError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:3: not valid YAML:") and "column" in str(err.value)
    assert err.value.line == 3


def test_missing_file_and_duplicate_key(tmp_path):
    with pytest.raises(YamlError, match=r"nope.yaml: recipe does not exist"):
        load(tmp_path / "nope.yaml", "recipe")
    with pytest.raises(YamlError, match=r"^f.yaml:3: a.b: written twice in one mapping \(first on line 2\)$"):
        parse("a:\n  b: 1\n  b: 2\n", "f.yaml")


def test_unknown_key_names_line_and_closest_key():
    doc = parse("args:\n  lr: 0.1\n  wieght-decay: 1e-4\n", "r.yaml")
    with pytest.raises(YamlError) as err:
        doc.check_keys("args", {"lr", "weight_decay"}, what="flag", normalize=lambda k: k.replace("-", "_"))
    assert str(err.value) == "r.yaml:3: args.wieght-decay: unknown flag; did you mean 'weight_decay'?"
    assert doc.check_keys("", {"args"}) == {"args": {"lr": 0.1, "wieght-decay": 1e-4}}
    with pytest.raises(YamlError, match=r"^r.yaml:2: args.lr: expected a mapping, got float 0.1$"):
        doc.mapping("args.lr")
