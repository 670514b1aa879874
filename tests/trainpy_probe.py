"""A second ``--device-modules`` for the train.py tests: records the labels train.py's training loop received.

Listed after ``ltsam.timm`` it wraps the already hooked ``train_one_epoch`` and hands it the loader behind a
proxy that notes every batch's targets; after each epoch, each rank writes them to
``$LTSAM_PROBE_DIR/labels-<epoch>-<rank>.json``. It observes what was trained on, independently of ltsam.

It also lets train.py run DDP on CPU (gloo): train.py wraps the model with ``device_ids=[device]``, which torch
refuses for a CPU module; the wrapper here drops CPU device ids (a GPU run passes them unchanged).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class _RecordingLoader:
    def __init__(self, loader, sink: list[int]) -> None:
        self._loader, self._sink = loader, sink

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def __iter__(self):
        for input, target in self._loader:
            self._sink.extend(int(t) for t in target.reshape(-1).tolist())
            yield input, target


class _CpuFriendlyDDP(nn.parallel.DistributedDataParallel):
    def __init__(self, module: nn.Module, device_ids=None, *args, **kwargs) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def _wrap(original):
    @functools.wraps(original)  # keeps ltsam's marker: the hook stays visible to ltsam's start-up check
    def train_one_epoch(epoch, model, loader, *args, **kwargs):
        seen: list[int] = []
        metrics = original(epoch, model, _RecordingLoader(loader, seen), *args, **kwargs)
        rank = dist.get_rank() if dist.is_initialized() else 0
        Path(os.environ["LTSAM_PROBE_DIR"], f"labels-{epoch}-{rank}.json").write_text(json.dumps(seen))
        return metrics

    return train_one_epoch


_main = sys.modules["__main__"]
nn.parallel.DistributedDataParallel = _CpuFriendlyDDP  # timm >= 1.0.23 imports it in task.prepare_distributed
if hasattr(_main, "NativeDDP"):  # train.py <= 1.0.22 imported it at the top
    _main.NativeDDP = _CpuFriendlyDDP
_main.train_one_epoch = _wrap(_main.train_one_epoch)
