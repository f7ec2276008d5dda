"""The launcher's part of the memory tier: where the keeper lives, the size checks made before
anything starts, and a keeper that ends with the launcher that started it."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests.dist import WAIT_S
from triaxis.checkpoint import keeper
from triaxis.config import load_config
from triaxis.errors import UserError
from triaxis.launchers import memory_node
from triaxis.model import PRESETS
from triaxis.parallel.dims import ParallelDims


def _cfg(*overrides):
    return load_config(None, ["--checkpoint.memory_interval=1", *overrides])


def _dims(dp_shard=1):
    return ParallelDims(dp_replicate=1, dp_shard=dp_shard, tp=1, pp=1, world_size=dp_shard)


def test_state_size_falls_with_sharding():
    one = memory_node.state_bytes_per_rank(PRESETS["small"], _dims())
    two = memory_node.state_bytes_per_rank(PRESETS["small"], _dims(dp_shard=2))
    # fp32 parameters + AdamW's two moments: 12 bytes a parameter, halved by dp_shard=2
    from triaxis.model import param_counts

    assert one >= 12 * param_counts(PRESETS["small"])["total"]
    assert two == pytest.approx(one / 2, rel=0.02)


def test_a_small_tmpfs_is_refused_with_the_fix(monkeypatch, tmp_path):
    real = os.statvfs(tmp_path)
    small = SimpleNamespace(f_bavail=(64 << 20) // real.f_frsize, f_frsize=real.f_frsize)
    monkeypatch.setattr(memory_node.os, "statvfs", lambda _: small)
    with pytest.raises(UserError, match=r"--shm-size=\d+g.*TRIAXIS_KEEPER_DIR"):
        memory_node.check_node(_cfg(), PRESETS["small"], _dims(), 8, str(tmp_path))


def test_bound_covers_the_footprint(tmp_path):
    from triaxis.checkpoint.memory_tier import footprint_bytes

    per_rank = memory_node.state_bytes_per_rank(PRESETS["tiny"], _dims())
    bound = memory_node.check_node(_cfg(), PRESETS["tiny"], _dims(), 2, str(tmp_path))
    assert bound > footprint_bytes(per_rank, 2, 2)


def test_keeper_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(memory_node.DIR_ENV, str(tmp_path))
    assert memory_node.keeper_dir() == str(tmp_path)
    monkeypatch.delenv(memory_node.DIR_ENV)
    assert memory_node.keeper_dir() in ("/dev/shm", __import__("tempfile").gettempdir())


@pytest.mark.slow
def test_keeper_ends_with_its_launcher_even_when_killed(tmp_path):
    """A launcher SIGKILLed leaves no keeper holding host memory behind."""
    path = str(tmp_path / "k.sock")
    code = (
        "import os, sys, time\n"
        "from triaxis.checkpoint import keeper\n"
        f"keeper.start({path!r}, 2, 1 << 20, parent_pid=os.getpid())\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "up"
    client = keeper.KeeperClient(path, timeout_s=5)
    assert client.steps() == {}
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and os.path.exists(keeper.shard_dir(path)):
        time.sleep(0.1)
    assert not os.path.exists(keeper.shard_dir(path))
    assert client.steps() is None


def test_training_without_a_keeper_says_the_tier_is_off(monkeypatch):
    from triaxis.checkpoint.memory_save import SOCKET_ENV, MemoryTier

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    said = []
    log = SimpleNamespace(warn=said.append, info=said.append)
    assert MemoryTier.of(_cfg(), None, 0, None, log) is None
    assert len(said) == 1 and "memory tier is off" in said[0] and SOCKET_ENV in said[0]
    assert MemoryTier.of(load_config(None, []), None, 0, None, log) is None
    assert len(said) == 1  # off by default: nothing to say


def test_without_the_tier_the_written_config_is_unchanged():
    from triaxis.config import to_toml

    off, on = to_toml(load_config(None, [])), to_toml(_cfg())
    assert "memory_interval" not in off and "memory_keep" not in off  # as before the tier
    assert "memory_interval = 1" in on and "memory_keep = 2" in on
    assert to_toml(load_config(None, [])) == off
