"""The torch-version shim (triaxis.parallel.compat): each collective takes the newest name this
torch has and falls back to the 2.11 one, whichever torch runs the test (the other name is
patched in or away)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_workers
from triaxis.parallel import compat

NAMES = {
    "all_gather_single": ("all_gather_single", "all_gather_into_tensor"),
    "reduce_scatter_single": ("reduce_scatter_single", "reduce_scatter_tensor"),
}


def _recorder(calls: list, name: str):
    def record(output, input, **kwargs):
        calls.append((name, output, input, kwargs))

    return record


@pytest.mark.parametrize("shim", list(NAMES))
@pytest.mark.parametrize("present", [True, False], ids=["new", "fallback"])
def test_shim_calls_the_newest_name_this_torch_has(shim, present, monkeypatch):
    new, old = NAMES[shim]
    calls: list = []
    monkeypatch.setattr(dist, old, _recorder(calls, old))
    if present:
        monkeypatch.setattr(dist, new, _recorder(calls, new), raising=False)
    else:
        monkeypatch.delattr(dist, new, raising=False)
    out, inp = torch.zeros(4), torch.ones(2)
    kwargs = {"op": dist.ReduceOp.AVG} if shim.startswith("reduce") else {}
    getattr(compat, shim)(out, inp, group="g", **kwargs)
    want = new if present else old
    name_of = {"all_gather_single": compat.all_gather_name}
    assert name_of.get(shim, compat.reduce_scatter_name)() == want
    assert [(n, o is out, i is inp, kw) for n, o, i, kw in calls] == [
        (want, True, True, {"group": "g", "async_op": False, **kwargs})
    ]


def test_torch_version_is_the_installed_one():
    assert compat.TORCH_VERSION == tuple(int(x) for x in torch.__version__.split(".")[:2])
    assert compat.TORCH_VERSION >= (2, 11)


def _both_branches(rank, world):
    """The shim's results on gloo through this torch's names, then through the 2.11 ones."""
    out = {}
    for branch in ("newest", "2.11"):
        if branch == "2.11":  # a forked worker: the deletion dies with it
            for new, _ in NAMES.values():
                if hasattr(dist, new):
                    delattr(dist, new)
        gathered = torch.empty(2 * world)
        compat.all_gather_single(gathered, torch.full((2,), float(rank)))
        scattered = torch.empty(2)
        compat.reduce_scatter_single(scattered, torch.arange(2.0 * world) + rank)
        out[branch] = (gathered.tolist(), scattered.tolist(), compat.all_gather_name())
    return out


def test_both_branches_give_the_collective_results():
    for rank, got in enumerate(run_workers(_both_branches, 2)):
        # gathered: [0, 0, 1, 1]; reduce-scatter of arange(4) + r summed over r in {0, 1}.
        want = ([0.0, 0.0, 1.0, 1.0], [2.0 * rank * 2 + 1.0, 2.0 * rank * 2 + 3.0])
        assert got["newest"][:2] == want and got["2.11"][:2] == want, got
        assert got["2.11"][2] == "all_gather_into_tensor"


def _clip_partial_and_sharded(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from triaxis.train.optim import clip_grad_norm

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    partial = [torch.randn(6) * (r + 1) for r in range(world)]  # each rank's share of one sum
    shards = [torch.randn(2, 3) for _ in range(world)]
    norm_w = torch.nn.Parameter(distribute_tensor(torch.ones(6), mesh, [Replicate()]))
    matrix = torch.nn.Parameter(distribute_tensor(torch.zeros(2 * world, 3), mesh, [Shard(0)]))
    norm_w.grad = DTensor.from_local(partial[rank].clone(), mesh, [Partial()])
    matrix.grad = DTensor.from_local(shards[rank].clone(), mesh, [Shard(0)])
    want = torch.cat([sum(partial), torch.cat(shards).flatten()])
    norm = clip_grad_norm([norm_w, matrix], 1.0)
    got = torch.cat([norm_w.grad.full_tensor(), matrix.grad.full_tensor().flatten()])
    return float(norm), float(want.norm()), float((got - want / (want.norm() + 1e-6)).abs().max())


def test_clipping_scales_partial_dtensor_grads():
    """TP's sequence-parallel norm weights carry Partial(sum) gradients; torch 2.11's foreach
    multiply skipped them, so their gradients went unclipped (the TP parity runs drifted 1e-4)."""
    for norm, want, err in run_workers(_clip_partial_and_sharded, 2):
        assert norm == pytest.approx(want, rel=1e-6) and want > 1.0
        assert err <= 1e-7


def test_pipeline_stage_opens_no_connection_to_its_own_rank():
    """A V schedule's turn (stages pp-1, pp) lies on one rank: torch 2.11's warm-up sent a
    dummy tensor from that rank to itself, which gloo refuses (zbv, dualpipev failed at pp 2)."""
    from types import SimpleNamespace

    class Base:
        group_rank = 1

        def _get_init_p2p_neighbors_ops(self):
            return [SimpleNamespace(group_peer=p) for p in (0, 1, 1, 0)]

    ops = compat._stage_class(Base)()._get_init_p2p_neighbors_ops()
    assert [op.group_peer for op in ops] == [0, 0]


def test_this_torch_is_in_the_supported_range_the_readme_states():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d) for d in deps if Requirement(d).name == "torch").specifier
    assert spec.contains(torch.__version__.split("+")[0])  # compat.sh runs supported ones only
    lo = next(s.version for s in spec if s.operator == ">=")
    hi = next(s.version for s in spec if s.operator == "<")
    newest = f"{hi.split('.')[0]}.{int(hi.split('.')[1]) - 1}"
    assert f"Supported: torch {lo} … {newest}" in (root / "README.md").read_text()


def test_offload_leaves_checkpoints_empty_dummy_alone():
    """torch 2.11's checkpoint saves a 0-element requires-grad dummy beside each block input:
    offloading it doubled the count (8 tensors where the 4 block inputs are expected)."""
    from triaxis.parallel.activations import ActivationOffload

    hooks = ActivationOffload(torch.device("cpu"))
    dummy = torch.empty((0,), requires_grad=True)
    assert hooks._pack(dummy) is dummy and hooks.num_offloaded == 0
    hooks._pack(torch.ones(2, 3, requires_grad=True))
    assert hooks.num_offloaded == 1 and hooks.bytes_offloaded == 24


@pytest.mark.parametrize(
    "version,words", [("2.10.0", "outside the supported torch>=2.11"), ("2.11", "is not X.Y.Z")]
)
def test_compat_script_refuses_in_one_line_before_building_anything(version, words):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["bash", str(root / "scripts" / "compat.sh"), version],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not out.stdout
    assert not (root / f".venv-torch-{version}").exists()
