"""`triaxis launch` on this node: the local dry run, rendezvous discovery and errors, the EFA
environment, elastic node ranges. SageMaker: tests/test_launch_sagemaker.py; Slurm:
tests/test_slurm.py."""

import os

import pytest

from tests import helpers
from tests.parity import tiny_train_args
from triaxis.cli import main

tiny = tiny_train_args


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# -- this node ---------------------------------------------------------------------------------


def test_local_dry_run_prints_the_torchrun_command(byte_data, tmp_path, capsys):
    assert (
        main(
            [
                "launch",
                "--dry-run",
                "--nproc-per-node",
                "2",
                *tiny(byte_data, tmp_path, "--parallel.dp_shard=2"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "torch.distributed.run --nproc-per-node=2 --nnodes=1 --max-restarts=0 --standalone"
        " -m triaxis train"
        in out
        and "--train.device=cpu" in out
    )
    assert not tmp_path.joinpath("config.toml").exists()


def test_rendezvous_discovery_and_bad_endpoints(byte_data, tmp_path, capsys, monkeypatch):
    args = [
        "launch",
        "--backend",
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--dry-run",
        *tiny(byte_data, tmp_path),
    ]
    for var in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert main(args) == 2
    assert "--nnodes=2 needs --rdzv-endpoint HOST:PORT" in one_error(capsys)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # rank-0 host from the scheduler
    monkeypatch.setenv("MASTER_PORT", "29533")
    assert main(args) == 0
    out = capsys.readouterr()
    assert "--rdzv-endpoint=127.0.0.1:29533" in out.out and "(discovered)" in out.err
    assert main([*args, "--rdzv-endpoint", "node0:port"]) == 2
    assert "is not HOST:PORT" in one_error(capsys)
    monkeypatch.setattr("triaxis.launchers.torchrun.resolve", lambda host: [])
    assert main([*args, "--rdzv-endpoint", "node-that-is-not:29500"]) == 2
    assert "'node-that-is-not' does not resolve on this node" in one_error(capsys)


def test_the_launcher_sets_the_efa_environment_itself(byte_data, tmp_path, capsys, monkeypatch):
    names = ("FI_PROVIDER", "FI_EFA_FORK_SAFE", "FI_EFA_USE_DEVICE_RDMA", "GLOO_SOCKET_IFNAME")
    for name in names:  # absent now, and again after the test
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("FI_EFA_FORK_SAFE", "0")  # the user's choice is kept
    monkeypatch.setattr("triaxis.launchers.torchrun.efa_devices", lambda: ["rdmap16s27"])
    assert main(["launch", "--dry-run", "--nproc-per-node", "2", *tiny(byte_data, tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "1 EFA device(s) (rdmap16s27)" in err
    assert "network environment: FI_PROVIDER=efa, FI_EFA_FORK_SAFE=0 (yours, kept)" in err
    assert os.environ["FI_PROVIDER"] == "efa" and os.environ["FI_EFA_FORK_SAFE"] == "0"
    # One node, CPU: no socket interface to pin, no GPUDirect RDMA.
    assert "GLOO_SOCKET_IFNAME" not in os.environ and "FI_EFA_USE_DEVICE_RDMA" not in os.environ


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--nnodes", "2:x"], "is not N or MIN:MAX"),
        (["--nnodes", "3:2"], "need 1 <= MIN <= MAX"),
        (["--nnodes", "1:2"], "give --max-restarts >= 1"),
        (
            ["--nnodes", "1:2", "--max-restarts", "1", "--parallel.dp_shard=2"],
            "may run on 1 node(s), 1 processes",
        ),
        (["--nnodes", "1:2", "--backend", "slurm"], "slurm runs a fixed number of nodes"),
    ],
)
def test_elastic_node_range_bad_input(byte_data, tmp_path, capsys, extra, message):
    argv = [
        "launch",
        "--dry-run",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        "127.0.0.1:29499",
        *extra,
        *tiny(byte_data, tmp_path),
    ]
    assert main(argv) == 2
    helpers.one_error_line(capsys.readouterr().err, message)


def test_elastic_node_range_dry_run(byte_data, tmp_path, capsys):
    assert (
        main(
            [
                "launch",
                "--dry-run",
                "--nproc-per-node",
                "1",
                "--nnodes",
                "1:2",
                "--max-restarts",
                "2",
                "--rdzv-last-call",
                "5",
                "--rdzv-endpoint",
                "127.0.0.1:29499",
                *tiny(byte_data, tmp_path),
                "--parallel.dp_shard=-1",
            ]
        )
        == 0
    )
    cmd = capsys.readouterr().out
    assert "--nnodes=1:2" in cmd and "last_call_timeout=5" in cmd and "--max-restarts=2" in cmd
