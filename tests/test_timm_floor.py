"""setup.cfg's ``timm>=`` bound is the oldest timm that has every timm name ltsam needs beyond the registry.

CI (.ci/run) installs exactly that bound, so the whole suite passing there shows the bound works; this test keeps
the bound and the list below in step. The release that introduced each name was found by installing each timm
1.0.x with ``pip install --no-deps --target DIR timm==1.0.N`` and importing the names from it.
"""

from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import timm
from packaging import version

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"

# name -> first timm release that has it
NEEDED = {
    "timm.optim._optim_factory:default_registry": "1.0.12",  # ltsam.optim.registry
    "timm.task:ClassificationTask": "1.0.23",  # train.py >= 1.0.23's task form, in the hook's tests
    "timm.utils.summary:trim_summary": "1.0.31",  # ltsam train: a resumed run's summary.csv
    "timm.utils:CheckpointSaver.state_dict": "1.0.31",  # ltsam train: the saver's ranking in the checkpoint
}


def timm_floor() -> str:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    bounds = re.findall(r"^\s*timm>=([0-9.]+)\s*$", config["options"]["install_requires"], re.M)
    assert len(bounds) == 1, f"{SETUP_CFG}: expected one 'timm>=X' line in install_requires"
    return bounds[0]


def _resolve(name: str):
    module, attrs = name.split(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


def test_setup_cfg_timm_floor_is_the_oldest_release_with_every_needed_name():
    floor = timm_floor()
    assert floor == max(NEEDED.values(), key=version.parse), "setup.cfg's timm bound disagrees with NEEDED"
    assert version.parse(timm.__version__) >= version.parse(floor)
    for name in NEEDED:
        assert _resolve(name) is not None, name
