"""The memory tier end to end (issue 30): a run killed mid-way restores from its node's keeper
(or, when the keeper's copy is gone, corrupted or of another layout, from the durable tier), and
the run then equals one that was never interrupted: every logged loss, and the final weights
bit for bit. Each test names the tier it expects in the run's log."""

import pytest
import torch

from tests.helpers import final_weights, losses, train_args, triaxis
from triaxis.checkpoint import keeper

STEPS, DURABLE, KILL = 8, 4, 7
"""Durable checkpoints every 4 steps, memory copies every step; the kill strikes as step 7
starts, so the keeper holds step 6 and storage step 4."""
pytestmark = pytest.mark.slow


def _args(data, run, *extra):
    return train_args(
        data,
        run,
        f"--train.steps={STEPS}",
        f"--checkpoint.interval={DURABLE}",
        "--checkpoint.memory_interval=1",
        # Synchronous durable saves: step 4's is committed before the kill however slow the disk.
        "--checkpoint.async_save=false",
        *extra,
    )


@pytest.fixture(scope="module")
def reference(byte_data, tmp_path_factory):
    """The uninterrupted run, memory tier off: its losses and final weights."""
    run = tmp_path_factory.mktemp("ref") / "run"
    triaxis("train", *train_args(byte_data, run, f"--train.steps={STEPS}"))
    return losses(run), final_weights(run / "checkpoints")


def _same_as(reference, run, exact=True):
    """Losses to 1e-6; weights bit for bit, or to 1e-5 from another layout (another order of
    the gradient reduction)."""
    want, weights = reference
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), step
    final = final_weights(run / "checkpoints")
    for name, w in weights.items():
        if exact:
            assert final[name].equal(w), name
        else:
            torch.testing.assert_close(final[name], w, rtol=1e-5, atol=1e-6)


@pytest.fixture
def node_keeper(tmp_path):
    """A keeper this node runs outside the launcher (TRIAXIS_KEEPER_SOCKET): it outlives the
    killed process, as a node daemon would."""
    path = str(tmp_path / "keeper.sock")
    proc = keeper.start(path, keep=2, max_bytes=1 << 30)
    yield path, {"TRIAXIS_KEEPER_SOCKET": path}
    proc.kill()
    proc.wait()


def _killed_run(data, run, env, *extra):
    out = triaxis(
        "train",
        *_args(data, run, *extra),
        env={**env, "TRIAXIS_FAULT_KILL": f"0:{KILL}"},
        check=False,
    )
    assert out.returncode != 0
    return out


def test_torchelastic_restart_restores_from_the_launchers_keeper(byte_data, tmp_path, reference):
    """`triaxis launch` starts the node's keeper; rank 1 is SIGKILLed, torchelastic restarts
    both workers, and they restore step 6 from the keeper (storage holds step 4)."""
    run = tmp_path / "run"
    out = triaxis(
        "launch",
        "--nproc-per-node",
        2,
        "--max-restarts",
        1,
        *_args(byte_data, run, "--parallel.dp_shard=2", "--train.micro_batch=2"),
        env={"TRIAXIS_FAULT_KILL": f"1:{KILL}"},
    )
    text = out.stdout + out.stderr
    assert "memory tier: this node's keeper" in text
    assert f"restored from the memory tier (the keeper on this node) at step {KILL - 1}" in text
    assert "resumed from" not in text
    _same_as(reference, run, exact=False)


def test_restart_restores_from_a_node_keeper(byte_data, tmp_path, reference, node_keeper):
    _, env = node_keeper
    run = tmp_path / "run"
    _killed_run(byte_data, run, env)
    out = triaxis("train", *_args(byte_data, run), env=env)
    assert f"restored from the memory tier (the keeper on this node) at step {KILL - 1}" in (
        out.stdout + out.stderr
    )
    _same_as(reference, run)


def test_corrupted_memory_copy_falls_back_to_durable(byte_data, tmp_path, reference, node_keeper):
    path, env = node_keeper
    run = tmp_path / "run"
    _killed_run(byte_data, run, env)
    assert keeper.KeeperClient(path).corrupt(KILL - 1, 0)
    out = triaxis("train", *_args(byte_data, run), env=env)
    text = out.stdout + out.stderr
    assert f"memory tier: step {KILL - 1} not used (rank 0: missing, or its checksum" in text
    assert f"at step {DURABLE} (sample cursor" in text and "resumed from" in text
    _same_as(reference, run)


def test_keeper_gone_falls_back_to_durable(byte_data, tmp_path, reference, node_keeper):
    path, env = node_keeper
    run = tmp_path / "run"
    _killed_run(byte_data, run, env)
    keeper_dir = keeper.shard_dir(path)
    import shutil

    shutil.rmtree(keeper_dir)  # the node's memory is gone (its shards with it)
    out = triaxis("train", *_args(byte_data, run), env=env)
    text = out.stdout + out.stderr
    assert "restored from the memory tier" not in text
    assert f"at step {DURABLE} (sample cursor" in text and "resumed from" in text
    _same_as(reference, run)


def test_relayout_falls_back_to_durable(byte_data, tmp_path, reference, node_keeper):
    """Memory copies written by 2 ranks (dp_shard=2) do not restore a 1-process run: the
    layout differs, so the durable tier (which reshards) is used."""
    _, env = node_keeper
    run = tmp_path / "run"
    out = triaxis(
        "launch",
        "--nproc-per-node",
        2,
        *_args(byte_data, run, "--parallel.dp_shard=2", "--train.micro_batch=2"),
        env={**env, "TRIAXIS_FAULT_KILL": f"1:{KILL}"},
        check=False,
    )
    assert out.returncode != 0
    out = triaxis("train", *_args(byte_data, run), env=env)
    text = out.stdout + out.stderr
    assert f"memory tier: step {KILL - 1} not used (rank 0: written under another layout" in text
    assert f"at step {DURABLE} (sample cursor" in text
    _same_as(reference, run, exact=False)
