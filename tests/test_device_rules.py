"""NCCL's device rule on CPU (issue 23): no host tensor on the device group, in any layout.

A GPU run's default and mesh groups are NCCL groups, which refuse host (CPU) tensors; gloo
serves both, so the other multi-process tests cannot see a host value sent over the device
group. Here the trainer runs under tests/device_rules.py's proxy, which raises NCCL's error for
such a tensor, over the layouts whose collectives differ. Each run's losses are also compared
with the same layout without the proxy: the proxy changes where values are said to live, never
a number.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.chat_data import DOC_MASK, chat_data  # noqa: F401  (fixture)
from tests.device_rules import (
    DEVICE_BACKEND,
    HOST_ERROR,
    SENTINEL,
    device_rules,
    register_backend,
)
from tests.dist import run_workers
from tests.parity import BASE, make_config
from tests.test_mixture import mixture_toml, sources  # noqa: F401  (fixture)
from triaxis.config import load_config

LAYOUTS = {
    "dp_shard": {"parallel__dp_shard": 2},
    "tp": {"parallel__tp": 2},
    "pp": {"parallel__pp": 2, "train__micro_batch": 2},
    "cpu_offload_clip": {"parallel__dp_shard": 2, "parallel__cpu_offload": "true"},
    "validation": {"parallel__dp_shard": 2, "train__val_every": 2, "train__val_batches": 1},
    "pp_validation": {
        "parallel__pp": 2,
        "train__micro_batch": 2,
        "train__val_every": 2,
        "train__val_batches": 1,
    },
    "async_checkpoints": {
        "parallel__dp_shard": 2,
        "checkpoint__interval": 1,
        "checkpoint__save_final": "true",
    },
    "expert_parallel": {
        "model__preset": "tiny-moe",
        "model__moe_bias_update_rate": "1e-3",
        "parallel__dp_shard": 2,
        "parallel__ep": 2,
        "checkpoint__interval": 1,
        "checkpoint__save_final": "true",
    },
    "moe_tp": {
        "model__preset": "tiny-moe",
        "model__moe_bias_update_rate": "1e-3",
        "parallel__tp": 2,
        "checkpoint__interval": 1,
        "checkpoint__save_final": "true",
    },
    "moe_pp": {
        "model__preset": "tiny-moe",
        "model__tie_embeddings": "false",
        "model__moe_bias_update_rate": "1e-3",
        "parallel__pp": 2,
        "train__micro_batch": 2,
    },
    "mixture_validation": {
        "parallel__dp_shard": 2,
        "train__val_every": 2,
        "train__val_batches": 1,
    },
    "masked_loss_validation": {
        **DOC_MASK,
        "parallel__dp_shard": 2,
        "train__micro_batch": 2,
        "train__val_every": 2,
        "train__val_batches": 1,
    },
}
"""world 2 each; gradient clipping is on by default (train.grad_clip). Loss-masked layouts run
on the chat set (tests/chat_data.py), mixtures on three sources (tests/test_mixture.py), the
rest on the byte corpus."""
FAST = "dp_shard"


def _train(rank: int, world: int, data: str, run_dir: str, overrides: dict, rules: bool):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    overrides = {"train__steps": 3, "train__micro_batch": 4, **overrides}
    if data.endswith(".toml"):  # a mixture: its sources come from the file
        values = {**BASE, "train.run_dir": run_dir}
        values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        cfg = load_config(data, [f"--{k}={v}" for k, v in values.items()])
    else:
        cfg = make_config(data, run_dir, **overrides)
    if not rules:
        return Trainer(cfg, init_distributed("cpu")).fit().losses
    with device_rules() as refuse:
        env = init_distributed("cpu")
        env.device = SENTINEL
        result = Trainer(cfg, env).fit()
    assert not refuse.refused  # none raised and swallowed on the way
    return result.losses, result.val_losses


def _run(data, run_dir, overrides, rules=True):
    register_backend()
    backend = DEVICE_BACKEND if rules else "gloo"
    return run_workers(_train, 2, data, str(run_dir), overrides, rules, backend=backend)


@pytest.mark.parametrize(
    "layout",
    [pytest.param(k, marks=[] if k == FAST else [pytest.mark.slow]) for k in LAYOUTS],
)
def test_no_host_tensor_reaches_the_device_group(layout, request, tmp_path):
    overrides = LAYOUTS[layout]
    if "mixture" in layout:
        data = mixture_toml(tmp_path / "mix.toml", request.getfixturevalue("sources"))
    else:
        data = request.getfixturevalue("chat_data" if "masked" in layout else "byte_data")
    (losses, val_losses), _ = _run(data, tmp_path / "rules", overrides)
    assert sorted(losses) == [1, 2, 3]
    if "train__val_every" in overrides:
        assert sorted(val_losses) == [2]
    plain = _run(data, tmp_path / "plain", overrides, rules=False)[0]
    assert losses == pytest.approx(plain, rel=1e-5)


def _host_on_device_group(rank: int, world: int) -> list[str]:
    """The proxy itself: which of these collectives it refuses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from triaxis.parallel.host import new_host_group

    host_group = new_host_group()
    mesh = init_device_mesh("cpu", (world,))
    refused = []
    with device_rules():
        cases = {
            "host scalar, device group": lambda: dist.all_reduce(torch.tensor([1.0])),
            "device scalar, device group": lambda: dist.all_reduce(
                torch.tensor([1.0], device=SENTINEL)
            ),
            "host scalar, host group": lambda: dist.all_reduce(torch.zeros(1), group=host_group),
            "computed from host, device group": lambda: dist.all_reduce(
                torch.tensor([2.0]).pow(2).to(torch.float64)
            ),
            "host moved to the device": lambda: dist.all_reduce(torch.tensor([2.0]).to(SENTINEL)),
            "mixed with a device value": lambda: dist.all_reduce(
                torch.tensor([2.0]) * torch.ones(1, device=SENTINEL)
            ),
            "a DTensor's host partial sum": lambda: DTensor.from_local(
                torch.ones(()), mesh, [Partial()]
            ).full_tensor(),
            "a DTensor's device partial sum": lambda: DTensor.from_local(
                torch.ones((), device=SENTINEL), mesh, [Partial()]
            ).full_tensor(),
            # torch pickles onto the group's device (the current CUDA device under NCCL)
            "an object broadcast, device group": lambda: dist.broadcast_object_list([rank], src=0),
        }
        for name, call in cases.items():
            try:
                call()
            except RuntimeError as e:
                assert HOST_ERROR in str(e)
                refused.append(name)
    return refused


def test_the_proxy_refuses_host_tensors_on_the_device_group_only():
    register_backend()
    refused = run_workers(_host_on_device_group, 2, backend=DEVICE_BACKEND)
    expected = [
        "host scalar, device group",
        "computed from host, device group",
        "a DTensor's host partial sum",
    ]
    assert refused == [expected, expected]
