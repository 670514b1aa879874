"""ltsam.trainpy without train.py: the sampler settings (environment, -c YAML), the loader it builds, refusals."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest
from PIL import Image
from timm.data import create_dataset, create_loader
from torch.utils.data import IterableDataset

from ltsam.data.samplers import ClassAwareSampler, RepeatFactorSampler
from ltsam.trainpy import SamplerSpec, prepare_epoch, sampler_spec, train_py_config, wrap_create_loader

COUNTS = [9, 4, 2]


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for label, n in enumerate(COUNTS):
        (root / f"c{label}").mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * label, 0, 0)).save(root / f"c{label}" / f"{i}.png")
    return create_dataset("", root=str(root), is_training=True)


def test_sampler_spec_from_environment_and_yaml():
    assert sampler_spec({}, {}) is None and sampler_spec({"LTSAM_SAMPLER": "instance"}, {}) is None
    assert sampler_spec({"LTSAM_SAMPLER": "sqrt", "LTSAM_SAMPLER_OPTIONS": "num_samples=100, seed=3"}, {}) == \
        SamplerSpec("sqrt", num_samples=100, seed=3)
    config = {"ltsam_sampler": "repeat", "ltsam_sampler_options": {"threshold": 0.01, "seed": 1}}
    assert sampler_spec({}, config) == SamplerSpec("repeat", seed=1, threshold=0.01)
    # the environment wins over the YAML, option by option
    assert sampler_spec({"LTSAM_SAMPLER": "progressive", "LTSAM_SAMPLER_OPTIONS": "seed=5 epochs=9"},
                        {"ltsam_sampler": "sqrt", "ltsam_sampler_options": {"seed": 1}}) == \
        SamplerSpec("progressive", seed=5, epochs=9)


@pytest.mark.parametrize("environ, config, message", [
    ({"LTSAM_SAMPLER": "balance"}, {}, r"LTSAM_SAMPLER='balance' is not a sampler; choose one of balanced, sqrt, "
                                       r"progressive, repeat"),
    ({}, {"ltsam_sampler": "uniform"}, r"-c YAML key ltsam_sampler='uniform' is not a sampler"),
    ({"LTSAM_SAMPLER": "balanced", "LTSAM_SAMPLER_OPTIONS": "threshold=0.1"}, {},
     r"option 'threshold' does not apply to balanced; valid: num_samples, seed"),
    ({"LTSAM_SAMPLER": "repeat", "LTSAM_SAMPLER_OPTIONS": "num_samples=10"}, {},
     r"option 'num_samples' does not apply to repeat; valid: seed, threshold"),
    ({"LTSAM_SAMPLER": "sqrt", "LTSAM_SAMPLER_OPTIONS": "num_samples=many"}, {}, r"num_samples='many' is not a number"),
    ({"LTSAM_SAMPLER": "sqrt", "LTSAM_SAMPLER_OPTIONS": "num_samples"}, {}, r"'num_samples' is not key=value"),
    ({}, {"ltsam_sampler": "sqrt", "ltsam_sampler_options": [1]}, r"ltsam_sampler_options must be a mapping"),
])
def test_bad_sampler_settings_name_the_variable_and_the_choices(environ, config, message):
    with pytest.raises(ValueError, match=message):
        sampler_spec(environ, config)


def test_yaml_config_is_read_from_train_pys_dash_c(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("ltsam_sampler: sqrt\nepochs: 3\n")
    monkeypatch.setattr(sys, "argv", ["train.py", "--epochs", "2", "-c", str(path), "--opt", "sgd"])
    assert train_py_config() == {"ltsam_sampler": "sqrt", "epochs": 3}
    assert sampler_spec({}) == SamplerSpec("sqrt")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train_py_config() == {}


LOADER = dict(input_size=(3, 8, 8), batch_size=4, num_workers=0, use_prefetcher=False, persistent_workers=False)


def test_training_loader_gets_the_sampler_and_evaluation_stays(folder_dataset):
    create = wrap_create_loader(create_loader, SamplerSpec("balanced", num_samples=30))
    train = create(folder_dataset, is_training=True, **LOADER)
    assert isinstance(train.sampler, ClassAwareSampler) and len(train) == 30 // 4
    assert train.sampler.class_counts.tolist() == COUNTS  # labels from the folder reader, no image decoded
    evaluation = create(folder_dataset, is_training=False, **LOADER)
    assert not isinstance(evaluation.sampler, ClassAwareSampler)

    # before each epoch: train.py's seed, the scheduled total (progressive) and the epoch
    progressive = wrap_create_loader(create_loader, SamplerSpec("progressive"))(folder_dataset, is_training=True,
                                                                                 **LOADER)
    args = argparse.Namespace(seed=11, epochs=4, cooldown_epochs=2, grad_accum_steps=1)
    prepare_epoch({"loader": progressive, "args": args, "epoch": 3, "num_updates_total": 6 * len(progressive)})
    sampler = progressive.sampler
    assert (sampler.seed, sampler.epochs, sampler.epoch) == (11, 6, 3)
    labels = np.repeat(np.arange(3), COUNTS)
    batches = [int(y) for _, target in progressive for y in target]
    expected = ClassAwareSampler(labels, "progressive", epochs=6, seed=11)
    expected.set_epoch(3)
    assert batches == labels[list(expected)][: len(batches)].tolist()

    repeat = wrap_create_loader(create_loader, SamplerSpec("repeat", seed=2, threshold=0.5))(
        folder_dataset, is_training=True, **LOADER)
    prepare_epoch({"loader": repeat, "args": args, "epoch": 0, "num_updates_total": None})
    assert isinstance(repeat.sampler, RepeatFactorSampler) and repeat.sampler.seed == 2  # seed= wins


class _Stream(IterableDataset):
    def __iter__(self):
        yield from ()


def test_data_sets_no_index_sampler_can_serve_are_refused():
    create = wrap_create_loader(create_loader, SamplerSpec("sqrt"))
    with pytest.raises(ValueError, match=r"LTSAM_SAMPLER=sqrt: the training set is a stream \(_Stream\)"):
        create(_Stream(), is_training=True, **LOADER)
    with pytest.raises(ValueError, match=r"LTSAM_SAMPLER=sqrt: list shows no labels without decoding"):
        create([1, 2, 3], is_training=True, **LOADER)


def test_the_missing_hook_guard_leaves_other_scripts_alone():
    """Only timm's train.py (its _parse_args and config_parser) gets the start-up check, not any script that
    has a train_one_epoch and calls timm's optimizer factory (with its own closure loop)."""
    import types

    from timm.optim import create_optimizer_v2

    from ltsam.trainpy import guard_train_py

    script = types.ModuleType("script")
    script.train_one_epoch, script.create_optimizer_v2 = (lambda: None), create_optimizer_v2
    guard_train_py(script)
    assert script.create_optimizer_v2 is create_optimizer_v2
    script._parse_args, script.config_parser = (lambda: None), object()
    guard_train_py(script)
    assert script.create_optimizer_v2 is not create_optimizer_v2
