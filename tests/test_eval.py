"""``ltsam eval``: a checkpoint on folder, list and ImageNet-C-style sets gives the accuracy the training run
reported on the same images; folders map to classes by name, number or WordNet id; bad sets are refused."""

from __future__ import annotations

import json

import pytest
from timm.data import ImageNetInfo

from ltsam.data.factory import create_lt_dataset
from ltsam.evaluate import EvalSetError, folder_labels
from ltsam_common.cli import main as ltsam_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def export_digits(root, list_file=None) -> None:
    """The digits-LT test split as PNG files in class-name folders (and a "path label" list next to root)."""
    test = create_lt_dataset("digits-lt", split="test", root=None, imb_factor=None, n_max=None)
    lines = []
    for i in range(len(test)):
        image, label = test[i]
        path = root / test.classes[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        lines.append(f"{path.relative_to(root.parent)} {label}")  # the list sits next to root
    if list_file is not None:
        list_file.write_text("\n".join(lines) + "\n")


def test_eval_reproduces_the_training_report_on_every_kind_of_set(tmp_path, capsys):
    assert ltsam_cli(["train", "--n-max", "30", "-b", "32", "--epochs", "1", "--no-progress", "--output",
                      str(tmp_path), "--experiment", "run"]) == 0
    trained = json.loads((tmp_path / "run" / "results.json").read_text())
    export_digits(tmp_path / "test", tmp_path / "test.txt")
    for severity in (1, 2):  # an ImageNet-C layout: corruption / severity / class folders
        (tmp_path / "c" / "noise").mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / "noise" / str(severity)).symlink_to(tmp_path / "test")
    code = ltsam_cli(["eval", str(tmp_path / "run" / "last.pth.tar"), "--set", f"folder=folder:{tmp_path / 'test'}",
                      "--set", f"list=list:{tmp_path / 'test.txt'}", "--set", f"c=imagenet-c:{tmp_path / 'c'}",
                      "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    for name in ("folder", "list", "c/noise/1", "c/noise/2"):
        report = results["sets"][name]
        assert (report["top1"], report["many"], report["few"]) == (trained["top1"], trained["many"], trained["few"])
    assert results["corruptions"]["c"]["mean_top1"] == trained["top1"]
    assert (tmp_path / "run" / "eval" / "per_class_folder.png").is_file()
    assert (tmp_path / "run" / "eval" / "severity_c.png").is_file()
    out = capsys.readouterr().out
    assert "c: top-1 (%) by corruption and severity" in out and "noise" in out

    (tmp_path / "bad.txt").write_text("test/0/0.png 12\n")
    assert ltsam_cli(["eval", str(tmp_path / "run" / "last.pth.tar"), "--set", f"bad=list:{tmp_path / 'bad.txt'}",
                      "--workers", "0"]) == 2
    assert "ltsam eval: eval set 'bad':" in (err := capsys.readouterr().err) and "label 12 outside [0, 10)" in err


def test_folders_map_by_name_number_or_wordnet_id():
    wnids = ImageNetInfo().label_names()
    assert folder_labels("s", ["cat", "dog"], ["dog", "cat"], 2) == {"cat": 1, "dog": 0}
    assert folder_labels("v2", ["0", "999"], [str(c) for c in range(1000)], 1000) == {"0": 0, "999": 999}
    assert folder_labels("v2", ["7", "12"], ["a"] * 1000, 1000) == {"7": 7, "12": 12}
    assert folder_labels("sketch", [wnids[5], wnids[2]], ["x"] * 1000, 1000) == {wnids[5]: 5, wnids[2]: 2}
    # trained on ImageNet folders (a subset of WordNet ids) or on 1000 folders numbered as ImageNet, sorted as text
    assert folder_labels("v2", ["2", "5"], [wnids[5], wnids[2]], 2) == {"2": 1, "5": 0}
    assert folder_labels("sketch", [wnids[2]], [wnids[5], wnids[2]], 2) == {wnids[2]: 1}
    numbered = sorted(str(c) for c in range(1000))
    assert folder_labels("sketch", [wnids[10], wnids[2]], numbered, 1000) == {wnids[10]: 2, wnids[2]: 112}
    for folders, classes, message in [
        (["7"], [wnids[5], wnids[2]], "class folder '7' is an ImageNet class outside the 2 training classes"),
        (["n01440764"], ["a", "b"], "its folders are WordNet ids, but the model has 2 classes, not ImageNet's 1000"),
        (["n99999999"], ["a"] * 1000, "class folder 'n99999999' is not an ImageNet-1k class"),
        (["12"], ["a"] * 10, "class folder '12' is outside the 10 training classes"),
        (["cat", "emu"], ["cat", "dog"], "class folder 'emu' is neither a training class name"),
    ]:
        with pytest.raises(EvalSetError, match=message):
            folder_labels("s", folders, classes, len(classes))
