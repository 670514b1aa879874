"""The embedded fine-tuning demonstration (offline, CPU): pre-train a small ViT with ``ltsam train`` on the
balanced CIFAR-10 shards, then fine-tune it on CIFAR-10-LT (IF 100) with each ``--finetune`` mode, plain SGD
and Focal-SAM, and print the All / Many / Medium / Few table (Markdown; ``--table FILE`` writes it too).

    python tools/finetune_demo.py --out runs/finetune_demo --table docs/results/finetune_demo_cpu.md

Every run is an ordinary ``ltsam train`` run folder under ``--out``, evaluated once, at its end, on the 10,000
test images; a finished run is reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ltsam.finetune import MODES
from ltsam.train import main as train_main

DATA = os.environ.get("LTSAM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=4", "depth=4",
       "embed_dim=96", "num_heads=3"]
COMMON = ["--data-dir", DATA, "--dataset", "cifar10-lt", "--img-size", "32", "--train-aug", "crop-flip",
          "--no-progress", "--workers", "0", "--device", "cpu", "--seed", "0", "--eval-interval", "1000"]


def run(out: Path, name: str, flags: list[str]) -> dict:
    results = out / name / "results.json"
    if not results.is_file():
        code = train_main([*COMMON, *VIT, *flags, "--output", str(out), "--experiment", name, "--overwrite"])
        if code:
            raise SystemExit(f"finetune_demo: run '{name}' failed with exit code {code}")
    return json.loads(results.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_demo"))
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-per-class", type=int, default=1000, help="balanced pre-training images/class")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--n-max", type=int, default=500, help="CIFAR-10-LT head class size (IF 100 profile)")
    parser.add_argument("--modes", nargs="+", default=["full", "classifier", "adaptformer", "lora", "vpt-deep"],
                        choices=MODES)
    parser.add_argument("--opts", nargs="+", default=["sgd", "focalsam"])
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args.out, "pretrain", ["--imb-factor", "1", "--n-max", str(args.pretrain_per_class), "--epochs",
                               str(args.pretrain_epochs), "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
                               "--warmup-epochs", "1", "-b", "128"])
    backbone = args.out / "pretrain" / "last.pth.tar"
    rows = []
    for mode in args.modes:
        for opt in args.opts:
            extra = ["--opt-kwargs", "rho=0.05", "gamma=1.5", "lam=0.7", "base=momentum"] if opt == "focalsam" else []
            report = run(args.out, f"{mode}-{opt}", [
                "--imb-factor", "100", "--n-max", str(args.n_max), "--epochs", str(args.epochs), "-b", "64",
                "--pretrained-path", str(backbone), "--finetune", mode, "--loss", "la", "--opt",
                "momentum" if opt == "sgd" else opt, *extra, "--lr", "0.001" if mode == "full" else "0.01",
                "--weight-decay", "5e-4", "--wd-profile", "official", "--warmup-epochs", "0",
                "--many-shot", str(args.n_max // 5), "--few-shot", str(args.n_max // 25)])
            rows.append((mode, opt, report))
    lines = ["| mode | optimizer | All | Many | Medium | Few | train s |", "|---|---|---|---|---|---|---|"]
    for mode, opt, r in rows:
        cells = [f"{100 * r[k]:.1f}" if r.get(k) is not None else "-" for k in ("top1", "many", "medium", "few")]
        lines.append(f"| {mode} | {opt} | {' | '.join(cells)} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")


if __name__ == "__main__":
    main()
