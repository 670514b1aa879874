"""Lightweight fine-tuning vs full: step time, peak memory, optimizer state and trainable parameters of a ViT,
for each ``--finetune`` mode with plain SGD and with a SAM-family method.

Each (mode, optimizer) runs in a process of its own, so its peak memory (CPU: peak RSS; CUDA: peak allocated)
is its own; the step time is the median over ``--steps`` after ``--warmup``. Every row also checks the claim
of the fine-tuning modes: frozen parameters hold no gradient and no optimizer state.

    python tools/bench_finetune.py --threads 1                     # CPU: ViT-Tiny-like, 32 px, batch 32
    python tools/bench_finetune.py --device cuda --model vit_base_patch16_clip_224 --img 224 --batch 128 \\
        --amp bf16 --json bench_finetune.json                      # the GPU size (CLIP ViT-B/16)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

MODES = ("full", "classifier", "bias", "ln", "vpt-deep", "adapter", "adaptformer", "lora", "ssf")
COUNTS = [100] * 80 + [5] * 20  # 100 classes, the last 20 the tail


def worker(args: argparse.Namespace, mode: str, opt: str) -> dict:
    import timm
    import torch

    import ltsam  # noqa: F401  (registers the optimizers)
    from ltsam.finetune import prepare_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = dict(img_size=args.img, num_classes=len(COUNTS))
    if args.model == "vit-small-cpu":
        model = timm.create_model("vit_tiny_patch16_224", patch_size=4, depth=6, **kwargs)
    else:
        model = timm.create_model(args.model, **kwargs)
    model = model.to(args.device)
    trainable = prepare_model(model, mode)
    sam = opt != "sgd"
    options = dict(rho=0.05, gamma=1.5, lam=0.7, class_counts=COUNTS, base="momentum") if sam else {}
    optimizer = timm.optim.create_optimizer_v2(trainable, opt=opt if sam else "momentum", lr=0.01,
                                               weight_decay=5e-4, **options)
    if sam:
        optimizer.attach(model)
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    y = torch.randint(0, len(COUNTS), (args.batch,), device=args.device)
    y[:2] = len(COUNTS) - 1  # two tail samples at least
    amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.amp == "bf16" else nullcontext

    def step() -> None:
        if sam:
            def closure(index=None):
                with amp():
                    xs, ys = (x, y) if index is None else (x[index], y[index])
                    return torch.nn.functional.cross_entropy(model(xs).float(), ys, reduction="none")
            optimizer.step(closure, targets=y)
        else:
            optimizer.zero_grad()
            with amp():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()

    times = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable_ids = {id(p) for p in trainable}
    frozen_with_grad = sum(p.grad is not None for p in model.parameters() if id(p) not in trainable_ids)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    frozen_state = sum(1 for p in optimizer.state if id(p) not in trainable_ids)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(mode=mode, opt=opt, step_ms=1000 * statistics.median(times), peak_mb=peak / 2**20,
                state_mb=state_bytes / 2**20, trainable=sum(p.numel() for p in trainable),
                total=sum(p.numel() for p in model.parameters()), frozen_with_grad=frozen_with_grad,
                frozen_in_state=frozen_state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-small-cpu",
                        help="vit-small-cpu (6 blocks, width 192, patch 4) or any timm ViT name")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--opt", nargs="+", default=["sgd", "focalsam"])
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, *args.worker)))
        return
    rows = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for mode in args.modes:
        for opt in args.opt:
            done = subprocess.run([sys.executable, __file__, *passthrough, "--worker", mode, opt],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| mode | opt | trainable | step (ms) | peak memory (MiB) | optimizer state (MiB) | frozen with grad / "
          "state |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['opt']} | {r['trainable']:,} of {r['total']:,} | {r['step_ms']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['state_mb']:.2f} | {r['frozen_with_grad']} / {r['frozen_in_state']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
