"""One definition of each hardware figure: hardware.toml, read by the planner and by MFU."""

import subprocess
import sys

import pytest

from triaxis.hardware import peak_bf16_flops
from triaxis.plan.hardware import load_catalog


@pytest.mark.parametrize(
    "device_name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_by_device_name(device_name, peak):
    assert peak_bf16_flops(device_name) == peak


def test_mfu_peak_is_the_planner_profile_peak():
    gpus = load_catalog().gpus
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == gpus["h100"].peak_flops
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == gpus["a100-80g"].peak_flops


def test_mfu_peak_is_none_on_cpu():
    import torch

    from triaxis.metrics.logger import peak_flops

    assert peak_flops(torch.device("cpu")) is None


def test_metrics_and_planner_import_light():
    """metrics reads the peaks without the planner; `triaxis plan` runs without torch."""
    code = (
        "import sys; import triaxis.metrics.logger; "
        "assert 'triaxis.plan' not in sys.modules, 'metrics imported the planner'; "
        "from triaxis.plan.cli import main; "
        "assert main(['--model', '8b', '--gpus', '64', '--gpu', 'h100', '--top', '1']) == 0; "
        "assert 'torch' not in sys.modules, 'the planner imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
