"""Step time, peak memory and host syncs of each SAM-family method: ltsam vs plain SGD vs the official schedule.

Step times are measured in one process, all variants interleaved round-robin, so load on the machine hits
them alike and the ratios are side by side; each peak-memory reading comes from a process of its own. The
official schedules are the plain re-derivations in tests/official.py (full-batch forwards, masks, one
backward per loss). Host syncs per step: on CUDA, every call torch's sync debug mode flags; on CPU, the
Python-level reads that synchronise on a GPU (``item``, ``tolist``, ``bool``/``float``/``int`` of a tensor,
``nonzero``, ``cpu``, ``numpy``; boolean-mask indexing inside torch is not seen there).

    python tools/bench_step.py                       # CPU: small ResNet-18 (BatchNorm) and ViT-Tiny (LayerNorm)
    python tools/bench_step.py --device cuda --models resnet50-bn vit-s16-ln --img 224 --batch 128 --amp bf16 \
        --json bench.json                            # the GPU sizes of issue 13
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
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
MODELS = {  # "-bn": batch-coupled (every pass full-batch), "-ln": not (passes forward their own samples)
    "resnet18-bn": ("resnet18", {}),
    "vit-tiny-ln": ("vit_tiny_patch16_224", {"patch_size": 4}),  # 32 px on CPU: patch 4
    "resnet50-bn": ("resnet50", {}),
    "vit-s16-ln": ("vit_small_patch16_224", {}),  # at --img 224
}
SYNC_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")


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
        return with_amp(lambda: fn(model, opt, x, y, **official_kwargs), args)
    if name == "sgd":
        def sgd_step():
            opt.zero_grad(set_to_none=True)
            criterion().mean().backward()
            opt.step()
        return with_amp(sgd_step, args)
    if name != "sam":
        kwargs.update(class_counts=counts)
    if name in ("imbsam", "ssesam"):
        kwargs.update(eta=20)
    if name == "ssesam":
        kwargs.update(epochs=2, gamma=0.5)
    sam = timm.optim.create_optimizer_v2(model, opt=name, lr=0.01, weight_decay=5e-4, base="momentum", **kwargs)
    sam.attach(model).set_epoch(1 if stage2 else 0)
    return with_amp(lambda: sam.step(criterion, targets=y, micro_batches=args.micro_batches), args)


def with_amp(step, args: argparse.Namespace):
    """The step under bf16 autocast (forwards and the backwards within it) when --amp bf16."""
    import torch

    def run():
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext():
            step()
    return run


def variants() -> list[tuple[str, bool]]:
    return [(method, official) for method in METHODS for official in (False, True)
            if not (official and method == "sgd")]


def host_syncs(step, device: str) -> int:
    """Host syncs of one call of ``step`` (module docstring: how they are counted on CUDA and on CPU)."""
    import torch

    if device.startswith("cuda"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
                torch.cuda.set_sync_debug_mode("default")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_READS}

    def counting(original):
        def read(*args, **kwargs):
            nonlocal count
            count += 1
            return original(*args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count


def time_model(model_key: str, args: argparse.Namespace, progress, task) -> tuple[dict, dict]:
    """Median step time of every variant, interleaved round-robin so load on the machine hits all alike, and
    the host syncs of one step of each (after the warm-up)."""
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    steps = {v: build_step(model_key, *v, args) for v in variants()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    syncs = {v: host_syncs(step, args.device) for v, step in steps.items()}
    times: dict = {v: [] for v in steps}
    for _ in range(args.steps):
        for v, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[v].append(time.perf_counter() - start)
        progress.advance(task)
    return {v: statistics.median(t) for v, t in times.items()}, syncs


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
            times, syncs = time_model(model_key, args, progress, time_task)
            for (method, official), seconds in times.items():
                row = next(r for r in rows if (r["model"], r["method"], r["official"]) == (model_key, method, official))
                row["time"], row["syncs"] = seconds, syncs[(method, official)]
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
        micro = f", ltsam in {args.micro_batches} micro-batches" if args.micro_batches > 1 else ""
        table = Table(title=f"{model}: batch {args.batch}, {args.img}px, {args.amp}, tail share "
                            f"{args.tail_share:.0%}, {args.device}, {threads} thread(s), median of {args.steps} "
                            f"steps{micro}")
        for col in ("method", "ltsam ms", "official ms", "x SGD", "x official", "peak MB", "mem x SGD",
                    "mem x official", "host syncs ltsam", "host syncs official"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for method in METHODS:
            ours = find(model, method, False)
            off = find(model, method, True) if method != "sgd" else None
            table.add_row(
                method, f"{ours['time'] * 1e3:.1f}", f"{off['time'] * 1e3:.1f}" if off else "-",
                f"{ours['time'] / sgd['time']:.2f}", f"{ours['time'] / off['time']:.2f}" if off else "-",
                f"{ours['peak'] / 2**20:.0f}", f"{ours['peak'] / max(sgd['peak'], 1):.2f}",
                f"{ours['peak'] / max(off['peak'], 1):.2f}" if off else "-",
                str(ours["syncs"]), str(off["syncs"]) if off else "-",
            )
        console.print(table)
    for model in args.models:  # the aims of issue 13 item 4
        ours = find(model, "ssesam-stage2", False)
        if model.endswith("-bn"):
            ratio = ours["time"] / find(model, "ssesam-stage2", True)["time"]
            console.print(f"aim: SSE-SAM stage 2 <= 0.70x official on {model}: {ratio:.2f}x")
        else:
            ratio = ours["time"] / find(model, "sgd", False)["time"]
            console.print(f"aim: SSE-SAM stage 2 <= {1 + args.tail_share + 0.15:.2f}x SGD on {model}: {ratio:.2f}x")
        worst = max((r for r in rows if r["model"] == model and not r["official"] and r["method"] != "sgd"),
                    key=lambda r: r["peak"])
        sgd_peak = max(find(model, "sgd", False)["peak"], 1)
        console.print(f"aim: peak memory <= 1.2x SGD on {model}: worst {worst['method']} "
                      f"{worst['peak'] / sgd_peak:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18-bn", "vit-tiny-ln"], choices=list(MODELS),
                        help="resnet50-bn and vit-s16-ln are the GPU sizes (with --img 224)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--tail-share", type=float, default=0.2, help="share of tail samples in each batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="bf16: every variant under autocast")
    parser.add_argument("--micro-batches", type=int, default=1, help="ltsam's steps in this many micro-batches")
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
