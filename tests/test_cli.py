"""The command-line surface: every command that a message or the README names runs, help without torch,
every trainer flag with help and default, the launcher checking the trainer's args, and import names."""

from __future__ import annotations

import argparse
import configparser
import re
import runpy
import sys
from pathlib import Path

import processes
import pytest

from ltsam.data.shards import records_from_arrays, write_shards
from ltsam.train.data import check_shard_splits
from ltsam_common import cli, train_args
from ltsam_launch import cli as launch_cli

ROOT = Path(__file__).resolve().parents[1]
# a command and, when it has them, its sub-command: ltsam X [Y], ltsam-launch, python -m MODULE [Y], python tools/X.py
WORD = r"(?: [a-z][a-z-]*(?![\w/.]))"
COMMAND = re.compile(rf"(?<![\w.-])(ltsam-launch|ltsam{WORD}{{1,2}}|(?:python3? )?-m (?:ltsam|tools)[\w.]*{WORD}?|"
                     rf"python3? tools/\w+\.py{WORD}?)")
SPAN = re.compile(r"`+([^`]+?)`+")  # `code` in Markdown, ``code`` in docstrings, `command` in messages


def mentioned_commands() -> dict[str, str]:
    """Each command written in backticks in the package, launcher and tools sources (messages, docstrings) or in
    the README (also its code blocks), with one file that names it."""
    found: dict[str, str] = {}
    sources = [ROOT / "README.md", *sorted(ROOT.glob("plugin/**/*.py")), *sorted(ROOT.glob("launch/**/*.py")),
               *sorted(ROOT.glob("tools/*.py"))]
    for path in sources:
        text = path.read_text()
        if path.suffix == ".py":  # a message's string literals continued over lines, joined as Python joins them
            text = re.sub(r"""(["'])\s*\n\s*[rfbu]*\1""", "", text)
        chunks = [m.group(1) for m in SPAN.finditer(text)]
        if path.suffix == ".md":
            chunks += [line for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S) for line in block.splitlines()]
        for chunk in chunks:
            for match in COMMAND.finditer(chunk):
                found.setdefault(match.group(1), str(path.relative_to(ROOT)))
    return found


def help_exit(command: str, monkeypatch) -> int:
    """Run `command --help` in this process (torch is imported once for all) and return its exit status."""
    words = command.split()
    if words[0] == "ltsam-launch":
        main, argv = launch_cli.main, ["--help"]
    elif words[0] == "ltsam":
        main, argv = cli.main, [*words[1:], "--help"]
    else:
        module = words[words.index("-m") + 1] if "-m" in words else None
        rest = words[words.index(module) + 1:] if module else words[2:]
        target = module or str(ROOT / words[1])
        monkeypatch.setattr(sys, "argv", [target, *rest, "--help"])

        def main(_argv):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
            return 0
        argv = []
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code or 0


@pytest.mark.filterwarnings("ignore:'ltsam.data.shards' found in sys.modules:RuntimeWarning")  # runpy, harmless
def test_every_mentioned_command_runs(monkeypatch, capsys):
    commands = mentioned_commands()
    assert {"ltsam train", "ltsam shards write", "ltsam-launch"} <= commands.keys()  # the extraction finds them
    failed = {}
    for command, where in sorted(commands.items()):
        if help_exit(command, monkeypatch) != 0:
            failed[command] = (where, capsys.readouterr().err[-500:])
    assert not failed, failed


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--lrr", "1"]])
def test_help_and_flag_errors_without_torch(argv):
    """`ltsam --help`, `ltsam train --help` and a mistyped flag answer before torch or timm is imported."""
    code = (f"import sys; from ltsam_common.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'ltsam'))\n"
            "assert not heavy, heavy")
    processes.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_trainer_flag_has_help_and_default():
    parser = train_args.build_parser()
    formatter = train_args.HelpFormatter(parser.prog)
    for action in parser._actions:
        assert action.help, action.option_strings
        if action.nargs != 0 and action.dest != "help":  # a switch is off unless given
            assert "default" in formatter._get_help_string(action), action.option_strings
    assert "-c CONFIG, --config CONFIG" in parser.format_help()


def test_workers_default_fits_the_machine(monkeypatch):
    assert 1 <= train_args.FALLBACK_DEFAULTS["workers"] <= min(4, train_args.usable_cpus())
    assert train_args.parse_args(["--dataset", "imagenet-lt"]).workers == train_args.FALLBACK_DEFAULTS["workers"]


@pytest.mark.parametrize("override, message", [
    ("program.args.epochz=3", "program.args.epochz = 3: not a flag of ltsam train; did you mean 'epochs'?"),
    ("program.args.lrr=0.1", "program.args.lrr = 0.1: not a flag of ltsam train; did you mean 'lr'?"),
    ('program.extra_args=["--lrr", "0.1"]', "program.extra_args: ltsam train refuses it: unrecognized arguments: "
                                            "--lrr 0.1"),
    ('program.extra_args=["epochz"]', "program.extra_args: ltsam train refuses it: unrecognized arguments: epochz"),
    ("program.args.sampler=balancd", "program.args: ltsam train refuses it: argument --sampler: invalid choice: "
                                     "'balancd'"),
    ("program.args.epochs=0", "program.args: ltsam train refuses it: --epochs must be >= 1, got 0"),
])
def test_launcher_checks_the_trainers_args(override, message, capsys):
    assert launch_cli.main([str(ROOT / "yaml" / "quickstart.yaml"), override, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_launcher_leaves_values_of_the_job_shell_to_the_job():
    from launch_helpers import planned

    script = planned(ROOT / "yaml" / "imagenet_lt_r50_ssesam_slurm.yaml",
                     "program.args.seed=$${SLURM_ARRAY_TASK_ID}").files["launch-job.sbatch"]
    assert '--seed "${SLURM_ARRAY_TASK_ID}"' in script


def test_launcher_tells_the_trainer_its_recipe():
    """The trainer phrases its advice as overrides of the recipe the launcher ran (see test_train.py)."""
    from launch_helpers import planned

    recipe = ROOT / "yaml" / "imagenet_lt_r50_ssesam_slurm.yaml"
    assert planned(recipe).env[train_args.LAUNCH_RECIPE_ENV] == str(recipe)
    assert f"export {train_args.LAUNCH_RECIPE_ENV}={recipe}" in planned(recipe).files["launch-job.sbatch"]


def test_no_generic_top_level_import_names():
    """What setup.cfg installs is ltsam's own: ltsam, ltsam_common, ltsam_launch (never `launch`)."""
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    packages = options["options"]["packages"].split()
    mapped = [line.split("=")[0].strip() for line in options["options"]["package_dir"].splitlines() if "=" in line]
    top_level = {name.split(".")[0] for name in packages + mapped if name}
    assert top_level == {"ltsam", "ltsam_common", "ltsam_launch"}, top_level


def test_shards_info_and_a_missing_split_named_with_its_flag(tmp_path, capsys):
    images = (__import__("numpy").arange(6 * 8 * 8 * 3) % 251).astype("uint8").reshape(6, 8, 8, 3)
    write_shards(records_from_arrays(images, [0, 0, 0, 0, 1, 1]), tmp_path, split="validation", num_classes=2)
    capsys.readouterr()
    assert cli.main(["shards", "info", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == ("validation: 6 samples in 2 shards, 2 classes, largest class 4, "
                                               "smallest 2 (imbalance 2.0)")
    args = argparse.Namespace(data_dir=str(tmp_path), train_split="validation", val_split="test")
    with pytest.raises(SystemExit, match=r"has no split 'test' \(written: validation\); pick one of validation with "
                                         r"`--val-split NAME`, or write it with `ltsam shards write --split test"):
        check_shard_splits(args, "ltsam train: data set 'shards'")
