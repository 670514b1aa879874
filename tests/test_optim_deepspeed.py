"""SAM-family steps through DeepSpeed ZeRO 1 and 2 (2 gloo processes on CPU, half batches each) make the
same updates as one plain process with the whole batch."""

from __future__ import annotations

from pathlib import Path

import processes as children
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, conv_bn_net
from ddp_worker import METHODS, train

from ltsam.optim.deepspeed import DeepSpeedConfigError, check_config

HERE = Path(__file__).parent


def run_deepspeed(stage: int, processes: int, out: Path) -> dict:
    cmd = [*children.torchrun(processes), str(HERE / "deepspeed_worker.py"), str(stage), str(out)]
    result = children.run(cmd, env=children.env_with({"DS_ACCELERATOR": "cpu"}, tests_on_path=True))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_two_deepspeed_processes_equal_one_plain_process(stage, tmp_path):
    pytest.importorskip("deepspeed")
    distributed = run_deepspeed(stage, 2, tmp_path / "ds.pt")
    for name, kwargs in METHODS.items():
        single = [p.detach() for p in train(name, kwargs).parameters()]
        for a, b in zip(single, distributed[name]):
            assert torch.allclose(a, b, atol=1e-6), f"{name}, ZeRO {stage}: {(a - b).abs().max()}"


def test_configs_ltsam_cannot_honour_are_refused():
    opt = timm.optim.create_optimizer_v2(conv_bn_net(), opt="ssesam", class_counts=CLASS_COUNTS)
    with pytest.raises(DeepSpeedConfigError, match="stage=3 with SSESAM"):
        check_config({"zero_optimization": {"stage": 3}}, opt, "cuda")
    with pytest.raises(DeepSpeedConfigError, match="fp16.enabled=true with SSESAM: use bf16"):
        check_config({"fp16": {"enabled": True}}, opt, "cuda")
    with pytest.raises(DeepSpeedConfigError, match="no fp16 on CPU"):
        check_config({"fp16": {"enabled": True}}, torch.optim.SGD(conv_bn_net().parameters(), lr=0.1), "cpu")
    config = check_config({"zero_optimization": {"stage": 2}}, opt)
    assert config["zero_allow_untested_optimizer"] is True
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's own default (1.0) would change the update
    assert check_config({"gradient_clipping": 2.0}, opt)["gradient_clipping"] == 2.0
