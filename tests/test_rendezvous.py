"""Rendezvous and store waits (issue 24): configurable, generous by default, and a peer that
never comes ends in one line saying who did not join and what to check, exit 2 (not "a bug").
The two-host cases (a node that never starts, an unreachable endpoint) are test_multinode.py's;
these run on one machine."""

import subprocess
from datetime import timedelta

import pytest
import torch.distributed as dist

from tests.dist import free_port
from tests.helpers import ENV, command, one_error_line, train_args
from triaxis.errors import UserError
from triaxis.launchers import torchrun
from triaxis.launchers.torchrun import Rendezvous, TorchrunSpec, torchrun_argv


def test_agents_store_waits_last_the_rendezvous_timeout():
    """torch's c10d rendezvous store waits 60 s by default (read_timeout): an elastic restart
    on a loaded machine failed there. It follows --rdzv-timeout now."""
    rdzv = Rendezvous("10.0.0.1", 29400, True, "10.0.0.1", None)
    argv = torchrun_argv(TorchrunSpec(1, 2, rdzv_timeout_s=900), rdzv, ["triaxis", "train"])
    conf = next(a for a in argv if a.startswith("--rdzv-conf="))
    assert "join_timeout=900" in conf and "read_timeout=900" in conf


def test_a_store_timeout_in_the_launcher_is_one_user_line(monkeypatch):
    def store_wait_runs_out(args):
        raise dist.DistStoreError("wait timeout after 60000ms, keys: /torch.rendezvous.x.0")

    import torch.distributed.run

    monkeypatch.setattr(torch.distributed.run, "run", store_wait_runs_out)
    spec = TorchrunSpec(2, 2, rdzv_timeout_s=60)
    rdzv = Rendezvous("10.0.0.1", 29400, True, "10.0.0.1", None)
    with pytest.raises(UserError) as e:
        torchrun.run_torchrun(torchrun_argv(spec, rdzv, ["triaxis", "train"]), spec, rdzv)
    msg = str(e.value)
    assert "\n" not in msg and "bug" not in msg
    for words in ("10.0.0.1:29400", "after 60 s", "2 node(s) of 2 process(es)", "--rdzv-timeout"):
        assert words in msg, (words, msg)


@pytest.mark.slow
def test_a_rank_whose_peer_never_comes_fails_in_one_line(byte_data, tmp_path):
    """Rank 0 of 2, with a store (as torchrun's agent serves it) but no rank 1: after
    train.dist_timeout_s, one line naming the count that joined and the endpoint, exit 2."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {
        **ENV,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    proc = subprocess.run(
        command(
            "train",
            *train_args(byte_data, tmp_path / "run"),
            "--train.dist_timeout_s=3",
            "--train.hang_timeout_s=2",  # the watchdog stays below the collective timeout
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(
        proc.stderr,
        "rank 0:",
        "did not form within 3 s",
        "1 of 2 ranks joined",
        f"127.0.0.1:{store.port}",
        "train.dist_timeout_s",
    )
    assert not (tmp_path / "run").exists()  # nothing written
    del store


@pytest.mark.slow
def test_a_launch_whose_other_node_never_comes_fails_in_one_line(byte_data, tmp_path):
    """--nnodes 2 on a loopback endpoint, one launcher: the rendezvous times out after
    --rdzv-timeout in one line (expected nodes, endpoint, what to check), exit 2."""
    port = free_port()
    proc = subprocess.run(
        command(
            "launch",
            "--backend",
            "torchrun",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-timeout",
            "5",
            *train_args(byte_data, tmp_path / "run"),
        ),
        env={**ENV, "TORCH_CPP_LOG_LEVEL": "ERROR"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for words in (f"127.0.0.1:{port}", "within 5 s", "2 node(s)", "--rdzv-timeout", "network"):
        assert words in errors[0], (words, errors[0])
    assert not (tmp_path / "run").exists()


def test_the_timeout_is_a_config_field_with_a_generous_default():
    from triaxis.config import Config

    # 10x the store wait that failed under load, and longer than the 300 s it replaced.
    assert timedelta(seconds=Config().train.dist_timeout_s) >= timedelta(minutes=10)
