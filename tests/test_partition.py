"""Stage partitioner: balance, objectives, explicit splits, refusals; pipeline bad input."""

import dataclasses
import subprocess
import xml.dom.minidom

import pytest

from tests.helpers import command
from triaxis.errors import UserError
from triaxis.model import PRESETS
from triaxis.parallel.partition import PartitionInputs, partition, stage_rank
from triaxis.parallel.pipeline import check_schedule


def inputs(preset="8b", pp=4, v=1, schedule="1f1b", **kw) -> PartitionInputs:
    args = dataclasses.replace(PRESETS[preset], **kw)
    return PartitionInputs(
        args=args,
        pp=pp,
        virtual_stages=v,
        schedule=schedule,
        seq_len=4096,
        micro_batch=1,
        n_microbatches=8,
        shard_degree=8,
        tp=1,
    )


def test_every_block_placed_once_contiguously():
    for pp, v, sched in ((4, 1, "1f1b"), (4, 2, "interleaved-1f1b"), (2, 2, "zbv")):
        stages = partition(inputs(pp=pp, v=v, schedule=sched))
        blocks = [b for s in stages for b in s.blocks]
        assert blocks == list(range(32))
        assert all(s.num_blocks >= 1 for s in stages)


def test_speed_balances_compute_within_one_block():
    """Uniform blocks + a heavy LM head: the max stage is within one block of the ideal."""
    stages = partition(inputs(), memory_weight=0.0)
    flops = [s.flops_per_token for s in stages]
    block = stages[1].flops_per_token / stages[1].num_blocks
    assert max(flops) - sum(flops) / len(flops) <= block
    assert stages[-1].num_blocks < stages[1].num_blocks  # the head costs blocks' worth of FLOPs


def test_uniform_blocks_without_ends_split_evenly():
    x = inputs(preset="tiny", pp=2, vocab_size=8, n_layers=8)
    assert [s.num_blocks for s in partition(x)] == [4, 4]


def test_memory_and_speed_objectives_differ_where_they_should():
    """1F1B keeps pp - rank micro-batches in flight, so balancing memory gives the first stage
    fewer blocks, while balancing compute gives the head's stage fewer."""
    speed = [s.num_blocks for s in partition(inputs(), memory_weight=0.0)]
    memory = [s.num_blocks for s in partition(inputs(), memory_weight=1.0)]
    assert speed != memory
    assert memory[0] < memory[-1] and speed[-1] < speed[0]
    mems = [s.memory_bytes for s in partition(inputs(), memory_weight=1.0)]
    mems_speed = [s.memory_bytes for s in partition(inputs(), memory_weight=0.0)]
    assert max(mems) < max(mems_speed)
    blend = [s.num_blocks for s in partition(inputs(), memory_weight=0.5)]
    assert sum(blend) == 32


def test_v_schedules_place_stages_in_a_v():
    assert [stage_rank(s, 4, "zbv") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [stage_rank(s, 4, "interleaved-1f1b") for s in range(8)] == [0, 1, 2, 3] * 2


def test_explicit_split_and_refusals():
    stages = partition(inputs(pp=2), explicit=[20, 12])
    assert [s.num_blocks for s in stages] == [20, 12]
    with pytest.raises(UserError, match="places 31 blocks but the model has 32"):
        partition(inputs(pp=2), explicit=[20, 11])
    with pytest.raises(UserError, match="leaves a stage empty"):
        partition(inputs(pp=2), explicit=[32, 0])
    with pytest.raises(UserError, match="lists 3 stages but pp x virtual stages = 2"):
        partition(inputs(pp=2), explicit=[10, 10, 12])
    with pytest.raises(UserError, match="64 stages but the model has 32 blocks"):
        partition(inputs(pp=32, v=2, schedule="interleaved-1f1b"))


def test_schedule_rules():
    check_schedule("1f1b", pp=4, v=1, n_microbatches=4)
    with pytest.raises(UserError, match="needs at least 4 micro-batches"):
        check_schedule("1f1b", pp=4, v=1, n_microbatches=2)
    with pytest.raises(UserError, match="needs pp_virtual_stages >= 2"):
        check_schedule("interleaved-1f1b", pp=2, v=1, n_microbatches=4)
    with pytest.raises(UserError, match="exactly pp_virtual_stages=2"):
        check_schedule("zbv", pp=2, v=3, n_microbatches=8)
    with pytest.raises(UserError, match="multiple of pp=4"):
        check_schedule("interleaved-1f1b", pp=4, v=2, n_microbatches=6)
    with pytest.raises(UserError, match="choose one of .*gpipe"):
        check_schedule("bogus", pp=2, v=1, n_microbatches=4)


def _cli(*args):
    return subprocess.run(
        command(*map(str, args)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_pipeline_bad_input_from_the_cli(byte_data, tmp_path):
    base = [
        "launch",
        "--nproc-per-node",
        2,
        "--model.preset=tiny",
        f"--data.path={byte_data}",
        f"--train.run_dir={tmp_path}",
        "--parallel.pp=2",
        "--parallel.dp_shard=1",
        "--model.tie_embeddings=false",
    ]
    cases = {
        ("--model.n_layers=1",): "parallel.pp=2 is larger than the 1 transformer blocks",
        ("--train.micro_batch=8",): "needs at least 2 micro-batches",
        ("--parallel.pp_schedule=zbv",): "needs pp_virtual_stages >= 2",
        (
            "--parallel.pp_schedule=zbv",
            "--parallel.pp_virtual_stages=3",
        ): "exactly pp_virtual_stages=2",
        ("--parallel.pp_schedule=zb",): "not a valid choice",
        ("--parallel.pp_layers=3,3",): "places 6 blocks but the model has 4",
    }
    for extra, message in cases.items():
        proc = _cli(*base, "--train.global_batch=8", "--train.micro_batch=4", *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    tied = _cli(
        *base[:-1], "--model.tie_embeddings=true", "--train.global_batch=8", "--train.micro_batch=4"
    )
    assert tied.returncode == 2 and "tie_embeddings=false" in tied.stderr


def test_layout_picture(tmp_path):
    out = _cli(
        "layout",
        "--nodes",
        3,
        "--gpus-per-node",
        8,
        "--tp",
        4,
        "--pp",
        6,
        "--layers",
        6,
        "--svg",
        tmp_path / "l.svg",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith("server ") for line in lines) == 3
    gpus = [line for line in lines if line.strip().startswith("gpu ")]
    assert len(gpus) == 24 and all(", tp shard " in g for g in gpus)
    # every GPU holds a quarter of exactly one layer; each layer lives on 4 GPUs
    layers = [g.split("layer ")[1].split(",")[0] for g in gpus]
    assert sorted(layers) == sorted([str(i) for i in range(6)] * 4)
    assert "one model copy = pp x cp x tp = 24 GPUs = 3 server(s)" in out.stdout
    doc = xml.dom.minidom.parse(str(tmp_path / "l.svg"))
    assert len(doc.getElementsByTagName("rect")) == 3 + 24
