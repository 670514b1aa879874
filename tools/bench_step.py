"""Step time and peak memory of each SAM-family method: ltsam vs plain SGD vs the official schedule.

Step times are measured in one process, all variants interleaved round-robin, so load on the machine hits
them alike and the ratios are side by side; each peak-memory reading comes from a process of its own. The
official schedules are the plain re-derivations in tests/official.py (full-batch forwards, masks, one
backward per loss).

    python tools/bench_step.py                       # CPU: small ResNet-18 (BatchNorm) and ViT-Tiny (LayerNorm)
    python tools/bench_step.py --device cuda --batch 256 --img 224 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 100
# (label, ltsam optimizer name and kwargs, official step function name and kwargs, SSE-SAM epoch)
METHODS = {
    "sgd": ("sgd", {}, None, {}),
    "sam": ("sam", {"rho": 0.05}, "sam_step", {"rho": 0.05}),
    "imbsam": ("imbsam", {"rho": 0.05}, "imbsam_step", {"rho": 0.05}),
    "ssesam-stage1": ("ssesam", {"head_rho": 0.05, "tail_rho": 0.1}, "ssesam_step",
                      {"head_rho": 0.05, "tail_rho": 0.1}),
    "ssesam-stage2": ("ssesam", {"head_rho": 0.05, "tail_rho": 0.1, "stage2": True}, "ssesam_step",
                      {"head_rho": 0.0, "tail_rho": 0.1}),
    "focalsam": ("focalsam", {"rho": 0.2, "gamma": 3.0, "lam": 0.5}, "focalsam_step",
                 {"rho": 0.2, "gamma": 3.0, "lam": 0.5}),
}
MODELS = {
    "resnet18-bn": ("resnet18", {}),
    "vit-tiny-ln": ("vit_tiny_patch16_224", {"patch_size": 4}),
}


def class_counts(tail_classes: int) -> list[int]:
    """A long-tailed profile over 100 classes whose last ``tail_classes`` classes have < 20 samples."""
    head = [500 - 4 * i for i in range(NUM_CLASSES - tail_classes)]
    return head + [10] * tail_classes


def make_batch(batch: int, img: int, tail_share: float, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    n_tail = round(batch * tail_share)
    tail_first = NUM_CLASSES - 20
    y = torch.cat([torch.randint(0, tail_first, (batch - n_tail,), generator=gen),
                   torch.randint(tail_first, NUM_CLASSES, (n_tail,), generator=gen)])
    y = y[torch.randperm(batch, generator=gen)]
    x = torch.randn(batch, 3, img, img, generator=gen)
    return x.to(device), y.to(device)


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_step(model_key: str, method: str, official: bool, args: argparse.Namespace):
    """A fresh model (same seed for every variant) and a function running one step of the variant."""
    import timm
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import official as official_steps

    import ltsam  # noqa: F401

    torch.manual_seed(0)
    arch, extra = MODELS[model_key]
    size = {"img_size": args.img} if "vit" in arch else {}
    model = timm.create_model(arch, num_classes=NUM_CLASSES, **size, **extra).to(args.device).train()
    x, y = make_batch(args.batch, args.img, args.tail_share, args.device)
    counts = class_counts(20)
    name, kwargs, official_name, official_kwargs = METHODS[method]
    kwargs = dict(kwargs)
    stage2 = kwargs.pop("stage2", False)

    def criterion(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

    if official or name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if official:
        fn = getattr(official_steps, official_name)
        if name in ("imbsam", "ssesam"):
            official_kwargs = dict(official_kwargs, tail_classes=torch.arange(NUM_CLASSES - 20, NUM_CLASSES,
                                                                              device=args.device))
        if name == "focalsam":
            official_kwargs = dict(official_kwargs, class_counts=counts)
        return lambda: fn(model, opt, x, y, **official_kwargs)
    if name == "sgd":
        def sgd_step():
            opt.zero_grad(set_to_none=True)
            criterion().mean().backward()
            opt.step()
        return sgd_step
    if name != "sam":
        kwargs.update(class_counts=counts)
    if name in ("imbsam", "ssesam"):
        kwargs.update(eta=20)
    if name == "ssesam":
        kwargs.update(epochs=2, gamma=0.5)
    sam = timm.optim.create_optimizer_v2(model, opt=name, lr=0.01, weight_decay=5e-4, base="momentum", **kwargs)
    sam.attach(model).set_epoch(1 if stage2 else 0)
    return lambda: sam.step(criterion, targets=y)


def variants() -> list[tuple[str, bool]]:
    return [(method, official) for method in METHODS for official in (False, True)
            if not (official and method == "sgd")]


def time_model(model_key: str, args: argparse.Namespace, progress, task) -> dict:
    """Median step time of every variant, interleaved round-robin so load on the machine hits all alike."""
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    steps = {v: build_step(model_key, *v, args) for v in variants()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict = {v: [] for v in steps}
    for _ in range(args.steps):
        for v, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[v].append(time.perf_counter() - start)
        progress.advance(task)
    return {v: statistics.median(t) for v, t in times.items()}


def peak_memory(model_key: str, method: str, official: bool, args: argparse.Namespace) -> int:
    """Peak memory of one step above what the model, data and optimizer hold before it (run alone)."""
    import torch

    step = build_step(model_key, method, official, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        step()
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    step()
    step()
    return max(peak_rss_bytes() - base, 0)


def run_all(args: argparse.Namespace) -> list[dict]:
    from rich.progress import Progress

    rows = []
    with Progress() as progress:
        mem_task = progress.add_task("peak memory (one process each)", total=len(args.models) * len(variants()))
        time_task = progress.add_task("step time (interleaved)", total=len(args.models) * args.steps)
        for model_key in args.models:
            for method, official in variants():
                cmd = [sys.executable, __file__, "--worker", model_key, method, str(int(official)), *sys.argv[1:]]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{model_key}/{method} failed:\n{out.stderr[-2000:]}")
                rows.append({"model": model_key, "method": method, "official": official,
                             "peak": int(out.stdout.strip().splitlines()[-1])})
                progress.advance(mem_task)
            for (method, official), seconds in time_model(model_key, args, progress, time_task).items():
                row = next(r for r in rows if (r["model"], r["method"], r["official"]) == (model_key, method, official))
                row["time"] = seconds
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def find(model, method, official):
        return next(r for r in rows if (r["model"], r["method"], r["official"]) == (model, method, official))

    import torch

    console = Console()
    threads = torch.get_num_threads()
    for model in args.models:
        sgd = find(model, "sgd", False)
        table = Table(title=f"{model}: batch {args.batch}, {args.img}px, tail share {args.tail_share:.0%}, "
                            f"{args.device}, {threads} thread(s), median of {args.steps} steps")
        for col in ("method", "ltsam ms", "official ms", "x SGD", "x official", "peak MB", "mem x SGD",
                    "mem x official"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for method in METHODS:
            ours = find(model, method, False)
            off = find(model, method, True) if method != "sgd" else None
            table.add_row(
                method, f"{ours['time'] * 1e3:.1f}", f"{off['time'] * 1e3:.1f}" if off else "-",
                f"{ours['time'] / sgd['time']:.2f}", f"{ours['time'] / off['time']:.2f}" if off else "-",
                f"{ours['peak'] / 2**20:.0f}", f"{ours['peak'] / max(sgd['peak'], 1):.2f}",
                f"{ours['peak'] / max(off['peak'], 1):.2f}" if off else "-",
            )
        console.print(table)
    resnet = [r for r in rows if r["model"] == "resnet18-bn"]
    vit = [r for r in rows if r["model"] == "vit-tiny-ln"]
    if resnet:
        ratio = find("resnet18-bn", "ssesam-stage2", False)["time"] / find("resnet18-bn", "ssesam-stage2", True)["time"]
        console.print(f"aim: SSE-SAM stage 2 <= 0.70x official on the ResNet: {ratio:.2f}x")
    if vit:
        ratio = find("vit-tiny-ln", "ssesam-stage2", False)["time"] / find("vit-tiny-ln", "sgd", False)["time"]
        console.print(f"aim: SSE-SAM stage 2 <= {1 + args.tail_share + 0.15:.2f}x SGD on the ViT: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--tail-share", type=float, default=0.2, help="share of tail samples in each batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); on a shared CPU, 1 keeps small sub-batch "
                             "passes from paying for thread synchronisation with busy cores")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        model_key, method, official = args.worker
        print(peak_memory(model_key, method, official == "1", args))
        return
    rows = run_all(args)
    report(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
