"""Reproduce long-tail results side by side: every method of a YAML recipe x seeds through ``ltsam train``.

    python tools/reproduce.py yaml/reproduce/mnist_lt_if100.yaml                  # run what is missing, report
    python tools/reproduce.py RECIPE.yaml --seeds 0 --only sgd_ce sam_ce --dry-run  # show the commands
    python tools/reproduce.py RECIPE.yaml --report                                # tabulate finished runs only

Each run is a subprocess writing into ``<output>/<recipe>/<method>/seed<k>/`` (log in ``train.log``), so a
crash or Ctrl-C loses at most the epoch under way: a run whose ``results.json`` is complete is skipped, and
one with a checkpoint continues with ``--resume auto``. The harness keeps each run's command, wall and CPU
time (summed over attempts) in ``reproduce.json``, and refuses to mix results of a changed command into a table.
Runs go seed-major (every method's seed 0 first), so a series stopped early still compares all methods.

Recipe keys (anything else is an error naming the file, line and key)::

    name: mnist_lt_if100        # folder under output (default: the file's stem)
    description: ...            # free text, copied into the Markdown report
    output: runs                # root of the run folders (relative to the current directory)
    seeds: [0, 1, 2]
    baseline: sgd_ce            # the method wall times are divided by (default: the first)
    args: {dataset: mnist-lt, epochs: 30, ...}    # ``ltsam train`` flags shared by every method
    methods:
      sgd_ce: {label: SGD + CE, args: {opt: sgd}}  # per-method flags; dicts (opt_kwargs) merge, null drops

Outputs next to the runs: ``results.md``, ``results.csv``, ``shot_groups.png`` (Many/Medium/Few bars, std
error bars) and ``per_class.png`` (mean per-class accuracy against training count, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ltsam_common import yamlio
from ltsam_launch import errors as launch_errors
from ltsam_launch import recipe as launch_recipe

RECIPE_KEYS = {"name", "description", "output", "seeds", "baseline", "args", "methods"}
METHOD_KEYS = {"label", "args"}
HARNESS_FLAGS = {"output", "experiment", "seed", "resume", "overwrite", "no_progress", "config"}
GROUPS = ("many", "medium", "few")
RESULTS, STATE, LOG, TRAIN_ARGS, SUMMARY = "results.json", "reproduce.json", "train.log", "args.yaml", "summary.csv"
LOCK = "reproduce.lock"


class RecipeError(ValueError):
    """A recipe the harness cannot run, with the file and the offending key in the message."""


@dataclass
class Method:
    key: str
    label: str
    args: dict


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    output: Path
    seeds: list[int]
    baseline: str
    methods: list[Method]

    @property
    def root(self) -> Path:
        return self.output / self.name


@dataclass
class Run:
    """One (method, seed) pair and the trainer command that produces it."""

    method: Method
    seed: int
    folder: Path
    argv: list[str]

    @property
    def name(self) -> str:
        return f"{self.method.key}/seed{self.seed}"


# -- recipe -----------------------------------------------------------------------------------------------
def trainer_flags() -> dict[str, tuple | None]:
    """The ``ltsam train`` flag names (dests) and their choices, so a misspelt flag or a loss / sampler name
    the trainer does not know fails before hours of runs."""
    from ltsam_common.train_args import build_parser

    return {a.dest: tuple(a.choices) if a.choices else None for a in build_parser()._actions if a.dest != "help"}


def _dest(key: str) -> str:
    return key.replace("-", "_")


def _check_args(doc: yamlio.YamlDoc, where: str, flags: dict[str, tuple | None]) -> dict:
    """Trainer flags with underscores; the harness's own flags are refused (it sets them per run)."""
    args = doc.check_keys(where, flags, what="ltsam train flag", normalize=_dest)
    for key in doc.mapping(where):
        dest, dotted = _dest(str(key)), f"{where}.{key}"
        if dest in HARNESS_FLAGS:
            raise doc.error(dotted, "set by the harness per run; remove it")
        choices = flags[dest]
        if choices and args[dest] is not None and args[dest] not in choices:
            raise doc.error(dotted, f"{args[dest]!r} is not one of {', '.join(map(str, choices))}")
    return args


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; every error names the file, the line and the key. ``${VAR:-default}``
    (e.g. ``${LTSAM_DATA:-../shared/data}``) is read from the environment, as the launcher does."""
    try:
        doc = yamlio.load(path, "recipe file")
        doc.data = launch_recipe.interpolate(doc)
        return _recipe(doc)
    except yamlio.YamlError as err:
        raise RecipeError(str(err)) from None
    except launch_errors.RecipeError as err:
        raise RecipeError(str(err)) from None


def _recipe(doc: yamlio.YamlDoc) -> Recipe:
    raw = doc.check_keys("", RECIPE_KEYS)
    flags = trainer_flags()
    shared = _check_args(doc, "args", flags)
    if not doc.mapping("methods", "a mapping of methods"):
        raise doc.error("methods", "must list at least one method")
    methods = []
    for key in raw["methods"]:
        spec = doc.check_keys(f"methods.{key}", METHOD_KEYS)
        own = _check_args(doc, f"methods.{key}.args", flags)
        methods.append(Method(str(key), str(spec.get("label", key)), merge_args(shared, own)))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise doc.error("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    baseline = str(raw.get("baseline", methods[0].key))
    if baseline not in {m.key for m in methods}:
        raise doc.error("baseline", f"names '{baseline}', which is not one of the methods")
    file = Path(doc.file)
    return Recipe(file, str(raw.get("name", file.stem)), str(raw.get("description", "")).strip(),
                  Path(str(raw.get("output", "runs"))), seeds, baseline, methods)


def merge_args(shared: dict, own: dict) -> dict:
    """Method flags override shared ones; dict flags (opt_kwargs, loss_kwargs) merge; ``null`` drops a flag."""
    out = dict(shared)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return {k: v for k, v in out.items() if v is not None}


def to_argv(args: dict) -> list[str]:
    """Flags as the trainer's argparse reads them: ``True`` a switch, lists nargs, dicts ``k=v`` pairs."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            continue
        argv.append(flag)
        if value is True:
            continue
        if isinstance(value, dict):
            argv += [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            argv += [str(v) for v in value]
        else:
            argv.append(str(value))
    return argv


def plan(recipe: Recipe, seeds: list[int], only: list[str] | None) -> list[Run]:
    """Runs in seed-major order, each with its trainer command (without the resume flag)."""
    known = [m.key for m in recipe.methods]
    unknown = [m for m in only or [] if m not in known]
    if unknown:
        raise RecipeError(f"{recipe.path}: --only names unknown method(s) {', '.join(unknown)}; "
                          f"methods: {', '.join(known)}")
    methods = [m for m in recipe.methods if not only or m.key in only]
    runs = []
    for seed in seeds:
        for method in methods:
            folder = recipe.root / method.key / f"seed{seed}"
            argv = [*to_argv(method.args), "--output", str(folder.parent), "--experiment", folder.name,
                    "--seed", str(seed), "--no-progress"]
            runs.append(Run(method, seed, folder, argv))
    return runs


# -- running ----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def finished(folder: Path) -> dict | None:
    """The run's report once training reached its last epoch (a --stop-epoch report is not final)."""
    report = read_json(folder / RESULTS)
    return report if report and report.get("epochs_done") == report.get("epochs") else None


def check_same_command(run: Run) -> None:
    """A folder made by another command would mix two experiments under one label: refuse it."""
    state = read_json(run.folder / STATE)
    if state and state.get("argv") != run.argv:
        old, new = state.get("argv", []), run.argv
        diff = [a for a in new if a not in old] + [f"(was) {a}" for a in old if a not in new]
        raise RecipeError(f"{run.folder} was made by another command (differs in: {' '.join(diff)}); "
                          "delete that folder or give the method a new key")


def epochs_done(folder: Path) -> int:
    """Epochs trained so far: the trainer appends one summary.csv row per epoch."""
    summary = folder / SUMMARY
    return max(0, len(summary.read_text().splitlines()) - 1) if summary.is_file() else 0


def planned_epochs(folder: Path) -> int | None:
    """The trainer's resolved epochs (its per-data-set default when the recipe names none), once it wrote them."""
    args = folder / TRAIN_ARGS
    return (yamlio.load(args).data or {}).get("epochs") if args.is_file() else None


def claim(folder: Path) -> int | None:
    """Lock the run folder for this harness, so two harnesses can work through one recipe side by side.

    Returns None once claimed, or the pid of the live harness holding it; a lock left by a dead one is taken.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = lock.read_text() if lock.is_file() else ""
            pid = int(text) if text.isdigit() else 0
            if pid and _alive(pid):
                return pid
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


def children_cpu() -> float:
    """User + system seconds of this process's finished children: the trainers, which run one at a time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(run: Run, progress: Progress, epoch_task, python: str) -> bool:
    """Train one run (resuming its checkpoint if any); returns whether it finished."""
    run.folder.mkdir(parents=True, exist_ok=True)
    state = read_json(run.folder / STATE) or {"argv": run.argv, "wall_s": 0.0, "attempts": 0}
    state.setdefault("cpu_s", None if state["attempts"] else 0.0)  # None: begun by a harness not timing CPU
    argv = [python, "-m", "ltsam.train", *run.argv]
    if any(run.folder.glob("*.pth.tar")):
        argv += ["--resume", "auto"]
    progress.reset(epoch_task, total=planned_epochs(run.folder), completed=epochs_done(run.folder),
                   description=run.name)
    start, cpu_start = time.perf_counter(), children_cpu()
    with open(run.folder / LOG, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                progress.update(epoch_task, total=planned_epochs(run.folder), completed=epochs_done(run.folder))
        finally:  # Ctrl-C: stop the trainer too, and keep the time spent so far
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            state.update(wall_s=round(state["wall_s"] + time.perf_counter() - start, 2),
                         attempts=state["attempts"] + 1)
            if state["cpu_s"] is not None:
                state["cpu_s"] = round(state["cpu_s"] + children_cpu() - cpu_start, 2)
            (run.folder / STATE).write_text(json.dumps(state, indent=1))
    return proc.returncode == 0 and finished(run.folder) is not None


def run_all(runs: list[Run], console: Console) -> list[Run]:
    """Run what is not finished, with one bar across runs and one over the current run's epochs."""
    todo = [r for r in runs if finished(r.folder) is None]
    for run in runs:
        check_same_command(run)
    console.print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run")
    failed = []
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        all_task = progress.add_task("all runs", total=len(runs), completed=len(runs) - len(todo))
        epoch_task = progress.add_task("", total=None)
        for run in todo:
            holder = claim(run.folder)
            if holder is not None:
                console.print(f"{run.name}: another harness (pid {holder}) is running it; skipped")
                progress.advance(all_task)
                continue
            try:  # another harness may have finished it since the plan was made
                ok = finished(run.folder) is not None or run_one(run, progress, epoch_task, sys.executable)
            finally:
                (run.folder / LOCK).unlink(missing_ok=True)
            if not ok:
                failed.append(run)
                tail = (run.folder / LOG).read_text().splitlines()[-15:]
                console.print(f"[red]{run.name} failed[/red]; last lines of {run.folder / LOG}:\n" + "\n".join(tail))
            progress.advance(all_task)
    return failed


# -- report -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One method's finished seeds, aggregated."""

    method: Method
    reports: list[dict]
    walls: list[float]
    cpus: list[float]  # only runs timed by a harness that records CPU time

    def values(self, key: str) -> list[float]:
        return [100 * r[key] for r in self.reports if r.get(key) is not None]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Sample std over seeds (None for a single seed: a spread of one value would read as certainty)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect(recipe: Recipe, runs: list[Run]) -> list[Row]:
    """Finished runs per method (methods without any are left out)."""
    rows = []
    for method in recipe.methods:
        folders = [r.folder for r in runs if r.method.key == method.key]
        done = [(rep, read_json(f / STATE) or {}) for f in folders if (rep := finished(f)) is not None]
        if done:
            rows.append(Row(method, [rep for rep, _ in done], [st.get("wall_s", rep["wall_s"]) for rep, st in done],
                            [st["cpu_s"] for _, st in done if st.get("cpu_s") is not None]))
    return rows


def cost_columns(row: Row, base: Row | None) -> list[str]:
    """Mean wall and CPU seconds per run and their ratios to the baseline's means."""
    cells = []
    for mine, theirs in ((row.walls, base.walls if base else []), (row.cpus, base.cpus if base else [])):
        cells.append(f"{statistics.fmean(mine):.0f}" if mine else "-")
        cells.append(f"{statistics.fmean(mine) / statistics.fmean(theirs):.2f}" if mine and theirs else "-")
    return cells


def table_rows(recipe: Recipe, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the console and Markdown tables."""
    base = next((r for r in rows if r.method.key == recipe.baseline), None)
    header = ["method", "seeds", "All", "Many", "Medium", "Few", "wall s", "wall x", "CPU s", "CPU x"]
    cells = [[row.method.label, str(len(row.reports)), fmt(row.values("mean_class_acc")),
              *(fmt(row.values(g)) for g in GROUPS), *cost_columns(row, base)] for row in rows]
    return header, cells


def shot_note(rows: list[Row]) -> str:
    """Which training counts fall in Many / Medium / Few, from the reports themselves."""
    report = rows[0].reports[0]
    parts = []
    for g in GROUPS:
        counts = [n for n, grp in zip(report["class_counts"], report["groups"]) if grp == g]
        parts.append(f"{g.capitalize()} {len(counts)} classes ({', '.join(map(str, counts))})")
    return "; ".join(parts)


def write_reports(recipe: Recipe, rows: list[Row], console: Console) -> None:
    """Console table, results.md, results.csv and the two plots, next to the run folders."""
    header, cells = table_rows(recipe, rows)
    table = Table(title=f"{recipe.name}: mean per-class accuracy (%), mean ± std over seeds")
    for name in header:
        table.add_column(name, justify="left" if name == "method" else "right")
    for line in cells:
        table.add_row(*line)
    console.print(table)
    note = (f"All = mean per-class accuracy; Many/Medium/Few = mean over the group's classes. {shot_note(rows)}. "
            "wall s / CPU s = mean seconds per run as the harness measured them (summed over resumed attempts, "
            "process start included; CPU = the trainer's user + system time, less sensitive to other jobs on a "
            f"shared machine, '-' for runs timed before it was recorded); x = ratio to {recipe.baseline}.")
    console.print(note)
    recipe.root.mkdir(parents=True, exist_ok=True)
    md = [f"# {recipe.name}", "", recipe.description, "", "| " + " | ".join(header) + " |",
          "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(c) + " |" for c in cells), "", note, ""]
    (recipe.root / "results.md").write_text("\n".join(md))
    base = next((r for r in rows if r.method.key == recipe.baseline), None)
    with open(recipe.root / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "label", "seeds", *(f"{k}_{s}" for k in ("all", *GROUPS) for s in ("mean", "std")),
                         "wall_s", "wall_ratio", "cpu_s", "cpu_ratio"])
        for row in rows:
            stats = [mean_std(row.values(k)) for k in ("mean_class_acc", *GROUPS)]
            writer.writerow([row.method.key, row.method.label, len(row.reports),
                             *(f"{v:.4g}" if v is not None else "" for ms in stats for v in ms),
                             *("" if c == "-" else c for c in cost_columns(row, base))])
    plot_shot_groups(recipe, rows, recipe.root / "shot_groups.png")
    plot_per_class(recipe, rows, recipe.root / "per_class.png")
    console.print(f"wrote {recipe.root}/results.md, results.csv, shot_groups.png, per_class.png")


def plot_shot_groups(recipe: Recipe, rows: list[Row], path: Path) -> None:
    """Many / Medium / Few bars per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ltsam.metrics import GROUP_COLORS

    x = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2), dpi=120)
    for i, group in enumerate(GROUPS):
        stats = [mean_std(r.values(group)) if r.values(group) else (np.nan, None) for r in rows]
        ax.bar(x + (i - 1) * width, [m for m, _ in stats], width, yerr=[np.nan if s is None else s for _, s in stats],
               capsize=2,
               color=GROUP_COLORS[group], label=group.capitalize())
    ax.set_xticks(x, [r.method.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{recipe.name}: shot groups (mean ± std over seeds)", fontsize=10, pad=20)
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_class(recipe: Recipe, rows: list[Row], path: Path) -> None:
    """Mean per-class accuracy against the class's training count (log axis), every method on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for row in rows:
        counts = np.asarray(row.reports[0]["class_counts"])
        acc = np.array([[np.nan if a is None else 100 * a for a in r["per_class_acc"]] for r in row.reports])
        order = np.argsort(counts, kind="stable")
        ax.plot(counts[order], np.nanmean(acc, axis=0)[order], marker="o", markersize=3, linewidth=1.2,
                label=f"{row.method.label} (n={len(row.reports)})")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{recipe.name}: per-class accuracy, mean over seeds", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------------
def _interrupt(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so the running trainer is stopped and the wall time so far is kept."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML recipe (see yaml/reproduce/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the recipe's seeds")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD", help="run only these methods")
    parser.add_argument("--dry-run", action="store_true", help="print each run's state and command, run nothing")
    parser.add_argument("--report", action="store_true", help="tabulate finished runs without running anything")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # messages stay whole lines (paths, commands), and a log file gets the table as wide as a terminal would
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    try:
        recipe = load_recipe(args.recipe)
        runs = plan(recipe, args.seeds or recipe.seeds, args.only)
        if args.dry_run:
            for run in runs:
                status = "done" if finished(run.folder) else "resume" if any(run.folder.glob("*.pth.tar")) else "new"
                console.print(f"[bold]{run.name}[/bold] ({status}): python -m ltsam.train {' '.join(run.argv)}",
                              soft_wrap=True, highlight=False)
            return 0
        failed = [] if args.report else run_all(runs, console)
    except RecipeError as err:
        console.print(f"[red]reproduce: {err}[/red]", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("reproduce: interrupted; run the same command again to continue")
        return 130
    rows = collect(recipe, runs)
    if rows:
        write_reports(recipe, rows, console)
    else:
        console.print("no finished runs to report yet")
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
