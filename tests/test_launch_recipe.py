"""Recipe loading: ${VAR} interpolation, dotted overrides, base includes (relative, deep-merged, cycles)."""

from __future__ import annotations

import pytest
from launch_helpers import write

from ltsam_launch.errors import RecipeError
from ltsam_launch.recipe import load


def test_env_interpolation_with_defaults_types_and_escape(tmp_path):
    path = write(tmp_path / "r.yaml", """
program:
  args:
    data_dir: ${DATA}/cifar
    output: ${OUT:-runs}/x
    workers: ${WORKERS:-4}
    amp: ${AMP:-false}
    note: $${SLURM_JOB_ID}
""")
    args = load(path, environ={"DATA": "/d", "WORKERS": "8"}).data["program"]["args"]
    assert args == {"data_dir": "/d/cifar", "output": "runs/x", "workers": 8, "amp": False,
                    "note": "${SLURM_JOB_ID}"}


def test_missing_env_var_names_file_key_and_hint(tmp_path):
    path = write(tmp_path / "r.yaml", "program:\n  script: ${TRAIN_PY}\n")
    with pytest.raises(RecipeError) as err:
        load(path, environ={})
    assert str(path) in str(err.value) and "program.script" in str(err.value)
    assert "TRAIN_PY is not set" in str(err.value) and "${TRAIN_PY:-default}" in str(err.value)


def test_overrides_set_typed_values_create_and_delete(tmp_path):
    path = write(tmp_path / "r.yaml", "program:\n  args: {lr: 0.1, amp: true}\n")
    recipe = load(path, ["program.args.lr=0.2", "program.args.epochs=5", "~program.args.amp",
                         "launcher.torchrun.nproc_per_node=2", "program.args.opt_kwargs={rho: 0.1}", "~no.such"],
                  environ={})
    assert recipe.data["program"]["args"] == {"lr": 0.2, "epochs": 5, "opt_kwargs": {"rho": 0.1}}
    assert recipe.get("launcher.torchrun.nproc_per_node") == 2
    assert recipe.source("program.args.lr") == "command line"


@pytest.mark.parametrize("bad", ["program.args.lr", "=3", "~a=1"])
def test_malformed_override(tmp_path, bad):
    path = write(tmp_path / "r.yaml", "name: x\n")
    with pytest.raises(RecipeError, match="command line"):
        load(path, [bad], environ={})


def test_override_into_a_scalar_is_an_error(tmp_path):
    path = write(tmp_path / "r.yaml", "name: x\n")
    with pytest.raises(RecipeError, match="name = 'x': is not a mapping"):
        load(path, ["name.sub=1"], environ={})


def test_base_is_relative_to_including_file_and_deep_merged(tmp_path):
    (tmp_path / "bases").mkdir()
    write(tmp_path / "bases" / "common.yaml", """
program:
  module: ltsam.train
  args: {lr: 0.01, epochs: 200, opt_kwargs: {rho: 0.05, base: momentum}}
launcher: {kind: local}
""")
    write(tmp_path / "bases" / "mid.yaml", "base: common.yaml\nprogram:\n  args: {epochs: 100}\n")
    child = write(tmp_path / "child.yaml", "base: bases/mid.yaml\nprogram:\n  args:\n    opt_kwargs: {rho: 0.1}\n")
    recipe = load(child, environ={})
    assert recipe.data["program"]["args"] == {"lr": 0.01, "epochs": 100, "opt_kwargs": {"rho": 0.1, "base": "momentum"}}
    assert "base" not in recipe.data
    assert recipe.source("program.args.lr").endswith("common.yaml:4")  # file:line of the key
    assert recipe.source("program.args.epochs").endswith("mid.yaml:3")
    assert recipe.source("program.args.opt_kwargs.rho").endswith("child.yaml:4")


def test_base_list_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "name: a\ndescription: from a\n")
    write(tmp_path / "b.yaml", "name: b\n")
    recipe = load(write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n"), environ={})
    assert recipe.data == {"name": "b", "description": "from a"}


def test_include_cycle_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="include cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load(tmp_path / "a.yaml", environ={})


def test_missing_base_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: base = '.*nope.yaml': recipe file not found"):
        load(write(tmp_path / "r.yaml", "base: nope.yaml\n"), environ={})
    with pytest.raises(RecipeError, match="a recipe must be a mapping"):
        load(write(tmp_path / "l.yaml", "- 1\n"), environ={})


def test_invalid_yaml_and_missing_env_var_name_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:3: <recipe>: not valid YAML: .*column"):
        load(write(tmp_path / "r.yaml", "name: x\nprogram:\n  args: {lr: [1, 2}\n"), environ={})
    with pytest.raises(RecipeError, match=r"s.yaml:3: program.args.data_dir = '\$\{DATA\}': environment variable"):
        load(write(tmp_path / "s.yaml", "program:\n  args:\n    data_dir: ${DATA}\n"), environ={})
