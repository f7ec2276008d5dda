"""MiCS hierarchical all-gather / reduce-scatter: when the partition group (dp_shard) spans
nodes, gather across nodes among same-local-rank peers, then within the node.

Two nodes x two ranks are simulated on one host by torchrun's LOCAL_WORLD_SIZE=2 (the node size
the trainer reads); the network-namespace test runs them as two real hosts."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from triaxis.errors import UserError
from triaxis.parallel.compat import (
    all_gather_name,
    all_gather_single,
    reduce_scatter_name,
    reduce_scatter_single,
)
from triaxis.parallel.dims import ParallelDims
from triaxis.parallel.hierarchical import NodeSplit, node_split, resolve

# -- where the groups sit on nodes (pure) ----------------------------------------------------


def dims(world, dp_shard, tp=1, dp_replicate=1, pp=1):
    return ParallelDims(dp_replicate, dp_shard, tp, pp, world)


def test_node_split_of_layouts():
    # 8 ranks, 4 a node, tp=2 x dp_shard=4: group {0,2,4,6} has 2 members on each of 2 nodes.
    assert node_split(dims(8, 4, tp=2), 4) == NodeSplit(2, 2)
    assert node_split(dims(8, 8), 4) == NodeSplit(2, 4)
    assert node_split(dims(16, 8, dp_replicate=2), 4) == NodeSplit(2, 4)
    assert node_split(dims(8, 4, dp_replicate=2), 4) == NodeSplit(1, 4)  # group = node
    assert node_split(dims(8, 2, tp=4), 4) == NodeSplit(2, 1)  # one member a node
    assert "not whole nodes" in node_split(dims(6, 6), 4).reason
    # 24 ranks, 8 a node: group {0..11} has 8 members on node 0 and 4 on node 1.
    assert "evenly" in node_split(dims(24, 12, dp_replicate=2), 8).reason
    # 12 ranks, 6 a node: group {0..3} inside node 0, group {4..7} on nodes 0 and 1.
    assert "differently" in node_split(dims(12, 4, dp_replicate=3), 6).reason


def test_resolve_auto_on_off():
    assert resolve("auto", dims(4, 4), 2) == NodeSplit(2, 2)
    assert resolve("off", dims(4, 4), 2) is None
    assert resolve("auto", dims(4, 4), 4) is None  # one node
    assert resolve("auto", dims(8, 2, tp=4), 4) is None  # one member a node: flat is the same
    assert resolve("on", dims(8, 2, tp=4), 4) == NodeSplit(2, 1)
    with pytest.raises(UserError, match="parallel.hierarchical=on needs a dp_shard group"):
        resolve("on", dims(4, 2, dp_replicate=2), 2)


# -- the collectives against the flat ones ---------------------------------------------------


def _collectives(rank, world, node):
    from triaxis.parallel.hierarchical import (
        HierarchicalAllGather,
        HierarchicalReduceScatter,
        build_groups,
    )

    d = dims(world, world)
    split = node_split(d, node)
    across, within = build_groups(d, split, rank)
    group = dist.group.WORLD
    chunk = 5
    torch.manual_seed(rank)
    out = {}
    # All-gather: the input is a view into the output (as FSDP passes it).
    got = torch.zeros(world * chunk)
    got[rank * chunk : (rank + 1) * chunk] = torch.randn(chunk)
    want = torch.empty_like(got)
    all_gather_single(want, got[rank * chunk : (rank + 1) * chunk].clone())
    HierarchicalAllGather(across, within, split)(got, got[rank * chunk : (rank + 1) * chunk], group)
    out["all_gather"] = bool(torch.equal(got, want))
    grads = torch.randn(world * chunk)
    for op in ("SUM", "AVG"):
        want, got = torch.empty(chunk), torch.empty(chunk)
        reduce_scatter_single(want, grads.clone(), op=getattr(dist.ReduceOp, op))
        HierarchicalReduceScatter(across, within, split)(
            got, grads.clone(), group, getattr(dist.ReduceOp, op)
        )
        out[op] = float((got - want).abs().max())
    return out


@pytest.mark.parametrize("world,node", [(4, 2), (6, 3), (4, 1)], ids=["2x2", "2x3", "4x1"])
def test_two_phase_collectives_equal_the_flat_ones(world, node):
    for r in run_workers(_collectives, world, node):
        assert r["all_gather"], r  # bit for bit, in the flat order
        assert r["SUM"] <= 1e-6 and r["AVG"] <= 1e-6, r  # summed in another order


# -- training: parity, and who sends what to whom --------------------------------------------

LAYOUT = {"parallel__dp_shard": 4, "train__micro_batch": 1}  # 2 micro-batches per step


def _as_nodes_of(rank, world, data, run_dir, overrides, node=2):
    os.environ["LOCAL_WORLD_SIZE"] = str(node)  # node 2: ranks 0,1 = node 0; 2,3 = node 1
    return train_collect(rank, world, data, run_dir, overrides)


@pytest.mark.slow
def test_training_matches_flat_and_one_process(byte_data, tmp_path):
    ref = train_collect(0, 1, byte_data, str(tmp_path / "ref"), {"train__micro_batch": 4})
    runs = {
        mode: run_workers(
            _as_nodes_of,
            4,
            byte_data,
            str(tmp_path / mode),
            {**LAYOUT, "parallel__hierarchical": mode},
            timeout_s=300,
        )[0]
        for mode in ("on", "off")
    }
    assert_same_run(runs["on"], ref)
    assert_same_run(runs["off"], ref)
    assert_same_run(runs["on"], runs["off"])


@pytest.mark.slow
def test_hsdp_with_two_phase_partition_groups_matches_one_process(byte_data, tmp_path):
    """dp_replicate=2 x dp_shard=2, one rank a node: each partition group spans 2 nodes with one
    member in each (on: phase 2 is a group of one), and replicas all-reduce on top."""
    ref = train_collect(0, 1, byte_data, str(tmp_path / "ref"), {"train__micro_batch": 4})
    layout = {"parallel__dp_replicate": 2, "parallel__dp_shard": 2, "parallel__hierarchical": "on"}
    got = run_workers(
        _as_nodes_of,
        4,
        byte_data,
        str(tmp_path / "hsdp"),
        {**layout, "train__micro_batch": 1},
        1,
        timeout_s=300,
    )[0]
    assert_same_run(got, ref)


def _record_traffic(rank, world, data, run_dir, mode):
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(data, run_dir, **LAYOUT, parallel__hierarchical=mode)
    trainer = Trainer(cfg, init_distributed("cpu"))
    calls = []
    # Recorded under 2.13's names, patched under the ones this torch's FSDP calls.
    attrs = {"all_gather_single": all_gather_name(), "reduce_scatter_single": reduce_scatter_name()}
    originals = {op: getattr(dist, attr) for op, attr in attrs.items()}

    def recording(op):
        def wrapper(output, input, *args, group=None, **kwargs):
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
            calls.append((op, tuple(ranks), input.numel() * input.element_size()))
            return originals[op](output, input, *args, group=group, **kwargs)

        return wrapper

    for op in originals:
        setattr(dist, attrs[op], recording(op))
    try:
        trainer.train_step(cursor=0)
    finally:
        for op, fn in originals.items():
            setattr(dist, attrs[op], fn)
    return calls


def _cross_node_bytes(calls, rank, node=2):
    """Bytes this rank exchanges with other nodes: every member of a collective sends its
    input (all-gather) or its share of it (reduce-scatter) to each other member."""
    total = 0
    for op, ranks, nbytes in calls:
        per_peer = nbytes if op == "all_gather_single" else nbytes // len(ranks)
        total += per_peer * sum(r // node != rank // node for r in ranks)
    return total


@pytest.mark.slow
def test_cross_node_traffic_only_between_same_local_ranks(byte_data, tmp_path):
    hier = run_workers(_record_traffic, 4, byte_data, str(tmp_path / "h"), "on", timeout_s=300)
    flat = run_workers(_record_traffic, 4, byte_data, str(tmp_path / "f"), "off", timeout_s=300)
    for rank, (calls, flat_calls) in enumerate(zip(hier, flat)):
        assert {r for _, r, _ in flat_calls} == {(0, 1, 2, 3)}  # flat: the whole group
        groups = {r for _, r, _ in calls}
        local = rank % 2
        # Phase groups only: across nodes = same local index; within = this rank's node.
        assert groups == {(local, local + 2), (rank - local, rank - local + 1)}, groups
        for op, ranks, _ in calls:
            spans = len({r // 2 for r in ranks}) > 1
            assert not spans or {r % 2 for r in ranks} == {local}, (op, ranks)
        # Every gather: across nodes (one chunk in), then within the node (two chunks in);
        # every reduce-scatter: within the node first, then across.
        ag = [(r, b) for op, r, b in calls if op == "all_gather_single"]
        rs = [(r, b) for op, r, b in calls if op == "reduce_scatter_single"]
        flat_ag = [b for op, _, b in flat_calls if op == "all_gather_single"]
        flat_rs = [b for op, _, b in flat_calls if op == "reduce_scatter_single"]
        assert len(ag) == 2 * len(flat_ag) and len(rs) == 2 * len(flat_rs) and flat_rs
        for (g1, b1), (g2, b2), chunk in zip(ag[::2], ag[1::2], flat_ag):
            assert g1 == (local, local + 2) and b1 == chunk
            assert g2 == (rank - local, rank - local + 1) and b2 == 2 * chunk
        for (g1, b1), (g2, b2), full in zip(rs[::2], rs[1::2], flat_rs):
            assert g1 == (rank - local, rank - local + 1) and b1 == full
            assert g2 == (local, local + 2) and b2 == full // 2
        # Cross-node bytes per rank (= per NIC): divided by the 2 local ranks.
        assert 2 * _cross_node_bytes(calls, rank) == _cross_node_bytes(flat_calls, rank) > 0


# -- the planner's cost model ----------------------------------------------------------------


def _p4d_problem(model="8b"):
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Problem, load_model
    from triaxis.plan.runtimes import RUNTIMES

    shape, _ = load_model(model)
    return Problem(
        shape, resolve_hardware(load_catalog(), None, "p4d"), RUNTIMES["triaxis"], 2048, 512
    )


def test_cost_model_divides_cross_node_bytes_per_nic():
    """Over 2 p4d nodes (8 GPUs, 4 x 100 Gbit EFA each) the cross-node phase moves
    (n-1)/n·S/g per NIC against the flat ring's (ng-1)/(ng)·S/g: the MiCS win. At 64 nodes
    the two volumes are within 1.5% and the NVLink phase makes the flat gather faster."""
    from triaxis.plan.collectives import all_gather_s, axis_link, hierarchical_gather_s

    hw, size = _p4d_problem().hw, 1 << 30
    nic = hw.network_bytes_per_s_per_gpu
    flat = all_gather_s(axis_link(hw, 16, 1), size)
    two = hierarchical_gather_s(hw, 16, 1, size)
    assert flat == pytest.approx(15 / 16 * size / (8 * nic), rel=0.01)
    nvlink = 7 / 8 * size / hw.cluster.nvlink_bytes_per_s
    assert two == pytest.approx(1 / 2 * size / 8 / nic + nvlink, rel=0.01)
    assert two < 0.75 * flat
    assert hierarchical_gather_s(hw, 512, 1, size) > all_gather_s(axis_link(hw, 512, 1), size)


def test_planner_offers_and_times_the_two_phase_layouts():
    import dataclasses

    from triaxis.plan.collectives import hierarchical_applies
    from triaxis.plan.problem import Layout
    from triaxis.plan.search import SearchSpace, enumerate_layouts, evaluate

    p = _p4d_problem()
    assert hierarchical_applies(8, 16, 1) and hierarchical_applies(8, 8, 2)
    assert not hierarchical_applies(8, 8, 1)  # one node
    assert not hierarchical_applies(8, 2, 8)  # one member a node
    space = SearchSpace(max_pp=1, max_tp=1, allow_offload=False, max_micro_batch=2)
    layouts = list(enumerate_layouts(p.shape, 16, 8, 512, space))
    two = [x for x in layouts if x.hierarchical]
    assert two and all(x.dp_shard == 16 for x in two)
    assert len(two) == sum(x.dp_shard == 16 for x in layouts) // 2
    flat = Layout(1, 16, 1, 1, 2)
    fast, slow = (evaluate(p, dataclasses.replace(flat, hierarchical=h)) for h in (True, False))
    assert fast.time.exposed_comm["dp_shard"] < slow.time.exposed_comm["dp_shard"]
    assert "hierarchical" in fast.layout.describe()


@pytest.mark.parametrize("world,per_node", [(16, 8), (32, 8), (8, 2), (12, 4)])
def test_every_two_phase_layout_the_planner_emits_runs(world, per_node):
    """The trainer accepts parallel.hierarchical=on for every layout the planner times with it
    (the same node split), and auto turns it on for each of them."""
    from triaxis.plan.search import SearchSpace, enumerate_layouts

    p = _p4d_problem()
    space = SearchSpace(max_pp=2, allow_offload=False, max_micro_batch=1)
    layouts = list(enumerate_layouts(p.shape, world, per_node, 96, space))
    offered = {(x.dp_shard, x.tp, x.pp) for x in layouts if x.hierarchical}
    assert offered
    for x in layouts:
        d = ParallelDims(x.dp_replicate, x.dp_shard, x.tp, x.pp, world)
        if x.hierarchical:
            assert (
                resolve("on", d, per_node)
                == resolve("auto", d, per_node)
                == node_split(d, per_node)
            )
        elif resolve("auto", d, per_node) is not None:  # the trainer could: so is it timed
            assert (x.dp_shard, x.tp, x.pp) in offered, x


def test_plan_snippet_and_auto_carry_the_choice(tmp_path, byte_data):
    from triaxis.config import load_config
    from triaxis.plan.auto import plan_for_world
    from triaxis.plan.report import toml_snippet
    from triaxis.plan.search import SearchSpace, plan

    space = SearchSpace(max_pp=1, max_tp=1, allow_offload=False)
    result = plan(_p4d_problem(), 16, "speed", space, keep=5)
    for p in result.plans:
        path = tmp_path / "plan.toml"
        path.write_text(toml_snippet(result, p))
        cfg = load_config(str(path), [f"--data.path={byte_data}"])
        assert cfg.parallel.hierarchical == ("on" if p.layout.hierarchical else "off")
    assert {p.layout.hierarchical for p in result.plans} == {True, False}
    # parallel.auto writes the planner's choice, never leaves it to auto.
    cfg = make_config(byte_data, str(tmp_path / "run"), parallel__auto="speed")
    planned, best, _ = plan_for_world(cfg, 4, "speed", "cpu", gpus_per_node=2)
    assert planned.parallel.hierarchical == ("on" if best.layout.hierarchical else "off")


def test_memory_model_counts_the_reordering_buffer():
    import dataclasses

    from triaxis.plan.memory import hierarchical_buffer_bytes, memory_of
    from triaxis.plan.problem import Layout

    p = _p4d_problem()
    flat = Layout(1, 16, 1, 1, 2)
    two = dataclasses.replace(flat, hierarchical=True)
    extra = memory_of(p, two, 16).comm_buffers - memory_of(p, flat, 16).comm_buffers
    # 8b: the vocabulary matrix (128256 x 4096) is the largest group, reduced in fp32.
    assert extra == hierarchical_buffer_bytes(p, 1) == 4 * 128256 * 4096
