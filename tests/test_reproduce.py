"""tools/reproduce.py smoke test: one method, one seed, two epochs on the embedded digits (seconds).

The full series (MNIST-LT, CIFAR-10-LT) are runs, not tests: see yaml/reproduce/ and docs/results/.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = reproduce
_spec.loader.exec_module(reproduce)


def write_recipe(tmp_path: Path, **changes) -> Path:
    recipe = {
        "name": "smoke",
        "output": str(tmp_path / "runs"),
        "seeds": [0],
        "args": {"dataset": "digits-lt", "epochs": 2, "workers": 0, "checkpoint_hist": 1},
        "methods": {"sgd_ce": {"label": "SGD + CE", "args": {"opt": "sgd"}}},
        **changes,
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_runs_reports_and_does_not_rerun(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert reproduce.main([str(recipe)]) == 0
    root = tmp_path / "runs" / "smoke"
    run = root / "sgd_ce" / "seed0"
    report = json.loads((run / "results.json").read_text())
    assert report["epochs_done"] == 2
    for name in ("results.md", "results.csv", "shot_groups.png", "per_class.png"):
        assert (root / name).stat().st_size > 0, name
    assert "SGD + CE" in (root / "results.md").read_text()
    assert (root / "results.csv").read_text().splitlines()[1].startswith("sgd_ce,SGD + CE,1,")
    state = json.loads((run / "reproduce.json").read_text())
    assert state["attempts"] == 1 and state["wall_s"] > 0 and state["cpu_s"] > 0
    stamp = (run / "results.json").stat().st_mtime_ns

    capsys.readouterr()
    assert reproduce.main([str(recipe)]) == 0
    assert "1 of 1 runs already finished; 0 to run" in capsys.readouterr().out
    assert (run / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "reproduce.json").read_text())["attempts"] == 1

    # the same folder under a changed command would mix two experiments in one row
    changed = write_recipe(tmp_path, args={"dataset": "digits-lt", "epochs": 2, "workers": 0, "checkpoint_hist": 1,
                                           "lr": 0.01})
    assert reproduce.main([str(changed), "--report"]) == 0  # reporting reads, it does not run
    assert reproduce.main([str(changed)]) == 2
    assert "made by another command (differs in: --lr 0.01)" in capsys.readouterr().out


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": {}}, "method: unknown key; did you mean 'methods'?"),
    ({"methods": {"sgd": {"lable": "x"}}}, "methods.sgd.lable: unknown key; did you mean 'label'?"),
    ({"args": {"epochz": 2}}, "args.epochz: unknown ltsam train flag; did you mean 'epochs'?"),
    ({"methods": {"sgd": {"args": {"seed": 3}}}}, "methods.sgd.args.seed: set by the harness per run"),
    ({"baseline": "sam"}, "baseline: names 'sam', which is not one of the methods"),
    ({"args": {"loss": "focal"}}, "args.loss: 'focal' is not one of ce, ldam, la, vs, bsce"),
])
def test_bad_recipe_names_file_line_and_key(tmp_path, capsys, changes, message):
    recipe = write_recipe(tmp_path, **changes)
    assert reproduce.main([str(recipe), "--dry-run"]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    leaf = message.split(":")[0].split(".")[-1]
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if f"{leaf}:" in text)
    assert f"{recipe}:{line}: {message}" in out, out


def test_method_args_merge_and_become_flags():
    merged = reproduce.merge_args({"opt": "sgd", "opt_kwargs": {"rho": 0.05}, "tta": True, "drop": 0.1},
                                  {"opt": "sam", "opt_kwargs": {"base": "momentum"}, "drop": None})
    assert merged == {"opt": "sam", "opt_kwargs": {"rho": 0.05, "base": "momentum"}, "tta": True}
    assert reproduce.to_argv({**merged, "mean": [0.5, 0.5], "amp": False}) == [
        "--opt", "sam", "--opt-kwargs", "rho=0.05", "base=momentum", "--tta", "--mean", "0.5", "0.5"]


@pytest.mark.parametrize("path", sorted((ROOT / "yaml" / "reproduce").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_give_valid_trainer_commands(path):
    """Every method of every shipped recipe parses as an ``ltsam train`` command (flags, choices, checks)."""
    from ltsam_common.train_args import parse_args

    recipe = reproduce.load_recipe(path)
    runs = reproduce.plan(recipe, recipe.seeds[:1], None)
    assert len(runs) == len(recipe.methods) >= 2
    for run in runs:
        args = parse_args(run.argv)
        assert args.seed == recipe.seeds[0] and args.output == str(run.folder.parent)


@pytest.mark.parametrize("data", [None, "/elsewhere/data"], ids=["LTSAM_DATA-unset", "LTSAM_DATA-set"])
def test_shipped_recipes_find_data_through_ltsam_data(monkeypatch, data):
    """No machine's absolute path: LTSAM_DATA, else ../shared/data relative to where the harness runs."""
    if data is None:
        monkeypatch.delenv("LTSAM_DATA", raising=False)
    else:
        monkeypatch.setenv("LTSAM_DATA", data)
    for path in sorted((ROOT / "yaml" / "reproduce").glob("*.yaml")):
        for method in reproduce.load_recipe(path).methods:
            assert method.args["data_dir"] == (data or "../shared/data"), (path.name, method.key)
