"""setup.cfg's ``timm>=`` floor is the oldest timm with what ``import ltsam`` needs (the optimizers in timm's
registry and the train.py hook ``ltsam.timm``); what needs a newer timm is in ``ltsam.timm_needs.NEWER_TIMM`` and
refused at start, naming the release.

CI (.ci/run) runs the suite at the newest timm and the optimizer and hook tests again at exactly the floor, so
these tables are checked against a real timm at both ends. The release that introduced each name was found by
installing each timm 1.0.x with ``pip install --no-deps --target DIR timm==1.0.N`` and importing ltsam with it
(timm 1.0.11 has no optimizer registry: ``get_optimizer_info``, ``OptimInfo`` and ``default_registry`` are new in
1.0.12; in 1.0.12 timm's gradient checkpointing is torch's reentrant form, which refuses the ``torch.autograd.grad``
every SAM step takes: ``model.set_grad_checkpointing()`` or train.py's ``--grad-checkpointing`` would fail).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import timm
from packaging import version

import ltsam
from ltsam.timm_needs import NEWER_TIMM, has, unmet

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
INSTALLED = version.parse(timm.__version__)

# name -> first timm release with it: what the optimizers and ltsam.timm import
FLOOR_NEEDS = {
    "timm.optim._optim_factory:default_registry": "1.0.12",  # ltsam.optim.registry
    "timm.optim:get_optimizer_info": "1.0.12",  # ltsam.optim.engine: the base optimizer's metadata
    # timm's checkpoint() / checkpoint_seq() non-reentrant by default (tests/test_optim_dropout.py checkpoints)
    "timm.layers:use_reentrant_ckpt": "1.0.13",
}


def timm_floor() -> str:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    bounds = re.findall(r"^\s*timm>=([0-9.]+)\s*$", config["options"]["install_requires"], re.M)
    assert len(bounds) == 1, f"{SETUP_CFG}: expected one 'timm>=X' line in install_requires"
    return bounds[0]


def test_setup_cfg_timm_floor_is_the_oldest_release_with_what_import_ltsam_needs():
    floor = timm_floor()
    assert floor == max(FLOOR_NEEDS.values(), key=version.parse), "setup.cfg's timm bound disagrees with FLOOR_NEEDS"
    assert INSTALLED >= version.parse(floor)
    assert [name for name in FLOOR_NEEDS if not has(name)] == []
    assert {"sam", "imbsam", "ssesam", "focalsam"} <= set(timm.optim.list_optimizers()), ltsam.__file__


def test_newer_timm_names_are_above_the_floor_and_present_exactly_from_their_release():
    """On the floor leg every name is missing, on the newest timm every one is present: the releases are true."""
    floor = version.parse(timm_floor())
    for name, (release, _, _) in NEWER_TIMM.items():
        assert version.parse(release) > floor, f"{name} is in timm {floor}: it belongs to the floor, not the gate"
        assert has(name) == (INSTALLED >= version.parse(release)), (name, release, timm.__version__)


def test_ltsam_train_refuses_at_start_an_older_timm_naming_the_release(monkeypatch, tmp_path, capsys):
    """With the names ltsam train needs missing (faked here; real on CI's floor leg), it stops before it sets
    anything up, in one sentence that names the release and the command to get it."""
    from timm.utils import CheckpointSaver, summary

    from ltsam_common.cli import main

    monkeypatch.delattr(summary, "trim_summary", raising=False)
    monkeypatch.delattr(CheckpointSaver, "state_dict", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--output", str(tmp_path / "out")])
    assert str(stopped.value) == (
        "ltsam train needs timm>=1.0.31 (timm.utils.summary.trim_summary, for a resumed run's summary.csv; "
        "timm.utils.CheckpointSaver.state_dict, for the checkpoint saver's ranking, kept in each checkpoint for an "
        f"exact resume), but timm {timm.__version__} is installed: pip install -U 'timm>=1.0.31'")
    assert not (tmp_path / "out").exists()
    assert unmet("ltsam eval") is None  # a feature with no entry is never stopped
