"""``ltsam eval``'s ``corrupt`` sets (ImageNet-C generated with ``imagecorruptions``): the same accuracies,
summary and table as the same corrupted images stored in ``CORRUPTION/SEVERITY`` folders; the same numbers on
every run; unknown names, missing packages and corruptions the installed libraries cannot run are refused."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ltsam import corruptions
from ltsam.evaluate import corrupt_sets, folder_set
from ltsam_common.cli import main as ltsam_cli

pytest.importorskip("imagecorruptions", reason="pip install '.[corruptions]'")
pytestmark = pytest.mark.usefixtures("one_thread")

CORRUPTIONS = ["gaussian_noise", "impulse_noise", "glass_blur"]  # seeded draws; the last two need the adapters
SEVERITIES = [1, 3]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A clean folder of 32 x 32 images in three classes and a checkpoint of one epoch of ltsam train on them."""
    root = tmp_path_factory.mktemp("corrupt")
    rng = np.random.default_rng(0)
    lines = []
    for label in range(3):
        for i in range(3):
            path = root / "clean" / str(label) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3)) // (label + 1)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            lines.append(f"{path.relative_to(root)} {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    assert ltsam_cli(["train", "--dataset", "list", "--train-list", str(root / "train.txt"), "--val-list",
                      str(root / "train.txt"), "--model",
                      "lt_cnn_small", "--model-kwargs", "width=8", "--in-chans", "3", "--mean", "0.5", "0.5", "0.5",
                      "--std", "0.5", "0.5", "0.5", "--img-size", "32", "-b", "3", "--epochs", "1", "--workers", "0",
                      "--no-progress", "--output", str(root), "--experiment", "run"]) == 0
    return root


def evaluate(root, *flags: str, output: str = "eval") -> tuple[int, dict | None]:
    code = ltsam_cli(["eval", str(root / "run" / "last.pth.tar"), "--workers", "0", "--output",
                      str(root / output), *flags])
    results = root / output / "results.json"
    return code, json.loads(results.read_text()) if code == 0 else None


def test_generated_sets_equal_the_same_images_in_folders_and_repeat(run, capsys):
    stored = run / "stored"
    clean = sorted((run / "clean").glob("*/*.png"))  # the folder set's order: class folder, then file name
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            for index, path in enumerate(clean):
                np.random.seed(corruptions.corruption_seed(index, corruption, severity))
                pixels = corruptions.imagecorruptions_module().corrupt(
                    np.asarray(Image.open(path).convert("RGB")), corruption_name=corruption, severity=severity)
                target = stored / corruption / str(severity) / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target)
    # the inputs the model sees: each generated sample equals its stored image, exactly
    clean_set = folder_set("gen", run / "clean", ["0", "1", "2"], [3, 3, 3], None)
    to_tensor = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    options = argparse.Namespace(corruptions=",".join(CORRUPTIONS), severities="1,3", tte="none")
    generated = corrupt_sets("gen", clean_set, options, {"input_size": (3, 32, 32)}, to_tensor, 3)
    assert [name for name, _, _ in generated] == [f"gen/{c}/{s}" for c in sorted(CORRUPTIONS) for s in SEVERITIES]
    for _, dataset, (_, corruption, severity) in generated:
        folder = folder_set("disk", stored / corruption / str(severity), ["0", "1", "2"], [3, 3, 3], to_tensor)
        for index in range(len(dataset)):
            (x, y), (x_disk, y_disk) = dataset[index], folder[index]
            assert torch.equal(x, x_disk) and y == y_disk
            assert not torch.equal(x, to_tensor(clean_set[index][0]))

    chosen = ["--corruptions", ",".join(CORRUPTIONS), "--severities", ",".join(map(str, SEVERITIES))]
    code, results = evaluate(run, "--set", f"gen=corrupt:{run / 'clean'}", "--set", f"disk=imagenet-c:{stored}",
                             *chosen)
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    gen, disk = results["corruptions"]["gen"], results["corruptions"]["disk"]
    assert gen == disk and set(gen) == {"mean_top1", "by_corruption", "by_severity"}
    assert set(gen["by_severity"]) == set(CORRUPTIONS) and set(gen["by_severity"]["glass_blur"]) == {"1", "3"}
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            assert results["sets"][f"gen/{corruption}/{severity}"] == results["sets"][f"disk/{corruption}/{severity}"]
    assert "gen: top-1 (%) by corruption and severity; mean over 3 corruptions" in out
    assert (run / "eval" / "severity_gen.png").is_file()

    # a second run, other batches: the same corrupted images, the same numbers
    code, again = evaluate(run, "--set", f"gen=corrupt:{run / 'clean'}", *chosen, "-b", "2", output="again")
    assert code == 0 and again["corruptions"]["gen"] == gen


def test_a_corrupted_sample_repeats_and_leaves_the_global_rng_alone(run):
    from ltsam.data.files import ImageListDataset

    samples = [(str(path), 0) for path in sorted((run / "clean").glob("*/*.png"))]
    clean = ImageListDataset(samples, class_counts=[len(samples)])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, second = (corruptions.CorruptedImages(clean, "gaussian_noise", 3, lambda x: x, np.asarray)
                     for _ in range(2))
    assert np.array_equal(first[4][0], second[4][0])
    assert not np.array_equal(first[4][0], np.asarray(corruptions.CorruptedImages(
        clean, "gaussian_noise", 4, lambda x: x, np.asarray)[4][0]))  # another severity: other draws
    assert np.array_equal(np.random.get_state()[1], before)


def test_every_corruption_runs_and_repeats_with_the_installed_libraries():
    corruptions.check_runs(corruptions.imagecorruptions_module().get_corruption_names("all"), corruptions.SEVERITIES)


def test_bad_corruption_choices_are_refused(run, capsys, monkeypatch):
    clean = f"gen=corrupt:{run / 'clean'}"
    assert evaluate(run, "--set", clean, "--corruptions", "gaussian_noise,fogg")[0] == 2
    valid = ", ".join(corruptions.imagecorruptions_module().get_corruption_names("all"))
    err = capsys.readouterr().err
    assert f"ltsam eval: --corruptions: unknown corruption 'fogg'; valid: {valid} (or a group:" in err
    assert evaluate(run, "--set", f"f=folder:{run / 'clean'}", "--severities", "2")[0] == 2
    assert "--corruptions and --severities choose what corrupt sets generate" in capsys.readouterr().err

    def broken(image, severity):
        raise TypeError("gaussian() got an unexpected keyword argument 'multichannel'")

    def unseeded(image, severity):
        pixels = np.asarray(image)
        return pixels ^ np.random.default_rng().integers(0, 256, pixels.shape, dtype=np.uint8)

    package = corruptions.imagecorruptions_module()
    monkeypatch.setitem(package.corruption_dict, "contrast", broken)
    monkeypatch.setitem(package.corruption_dict, "pixelate", unseeded)
    assert evaluate(run, "--set", clean, "--corruptions", "gaussian_noise,contrast")[0] == 2
    assert ("ltsam eval: eval set 'gen': corruption 'contrast' (severity 1) does not run with the installed "
            "libraries (TypeError: gaussian() got an unexpected keyword argument 'multichannel'); leave it out "
            "with --corruptions") in capsys.readouterr().err
    assert evaluate(run, "--set", clean, "--corruptions", "pixelate")[0] == 2
    assert "corruption 'pixelate' gives different images under the same seed" in capsys.readouterr().err


def test_a_missing_package_names_the_extra(monkeypatch):
    corruptions.imagecorruptions_module.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "imagecorruptions", None)
    try:
        with pytest.raises(corruptions.CorruptionError, match=r"pip install 'ltsam\[corruptions\]'"):
            corruptions.select("common", "1")
    finally:
        corruptions.imagecorruptions_module.cache_clear()
