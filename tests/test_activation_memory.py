"""Activation checkpointing (block and op level) and activation offload: the same gradients as
no checkpointing, and measured savings -- bytes kept for backward, matmuls run again."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from triaxis.model.llama import Transformer
from triaxis.model.presets import PRESETS
from triaxis.parallel.activations import apply_ac, checkpointed_blocks

MODES = {
    "none": ("none", "block", False),
    "full": ("full", "block", False),
    "every_2nd_block": ("selective", "block", False),
    "op": ("selective", "op", False),
    "full_offload": ("full", "block", True),
    "every_2nd_block_offload": ("selective", "block", True),
}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    model.init_weights(0)
    return model, torch.randint(0, 512, (2, 32))


def _model(base, mode: str):
    model = copy.deepcopy(base[0])
    ac, selective, offload = MODES[mode]
    hooks = apply_ac(model, ac, 2, selective, offload) if ac != "none" else None
    return model, hooks


def _loss(model, tokens):
    return model(tokens).logsumexp(-1).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_checkpointing_and_offload_keep_loss_and_grads(base, mode):
    ref, _ = _model(base, "none")
    ref_loss = _loss(ref, base[1])
    ref_loss.backward()
    model, hooks = _model(base, mode)
    loss = _loss(model, base[1])
    loss.backward()
    assert float(loss.detach()) == float(ref_loss.detach())
    ref_grads, grads = _grads(ref), _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-7, msg=name)
    if MODES[mode][2]:
        # Exactly the checkpointed blocks' inputs (B, T, dim) went through the host copy.
        n = len(checkpointed_blocks(4, *MODES[mode][:2], 2))
        assert hooks.num_offloaded == n
        assert hooks.bytes_offloaded == n * 2 * 32 * 64 * 4


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


class KeptBytes(TorchDispatchMode):
    """Records the storage of every tensor forward creates; `kept()` is the bytes of those
    still alive: what the graph holds for backward."""

    def __init__(self):
        super().__init__()
        self.made: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.made[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def kept(self) -> int:
        return sum(n for ref, n in self.made.values() if not ref.expired())


def _measure(base, mode: str) -> tuple[int, int]:
    """(bytes kept from forward to backward, matmuls run in backward)."""
    model, _ = _model(base, mode)
    with KeptBytes() as kept:
        loss = _loss(model, base[1])
    held = kept.kept() - loss.untyped_storage().nbytes()
    with _CountMatmuls() as mm:
        loss.backward()
    return held, mm.count


def test_op_level_checkpointing_keeps_less_than_none_and_recomputes_less_than_full(base):
    kept = {m: _measure(base, m) for m in ("none", "op", "full", "every_2nd_block")}
    # Memory: full keeps only block inputs, op-level also the matmul outputs, none everything.
    assert kept["full"][0] < kept["op"][0] < kept["none"][0], kept
    # Backward matmuls: op-level runs none of the forward's again; full runs the blocks' again
    # (6 of 7 per block: the recompute stops before w2, whose output backward never needs);
    # every 2nd block half of that.
    assert kept["op"][1] == kept["none"][1] < kept["every_2nd_block"][1] < kept["full"][1], kept
    assert kept["full"][1] - kept["none"][1] == 4 * 6, kept
    assert kept["every_2nd_block"][1] - kept["none"][1] == 2 * 6, kept


def test_planner_op_level_bytes_are_the_measured_ones(base):
    """The planner's op-level term (activations.op_saved_bytes_per_token) against the measurement:
    op-level keeps, over full checkpointing, exactly the 4 blocks' matmul outputs."""
    from triaxis.plan.activations import op_saved_bytes_per_token
    from triaxis.plan.problem import shape_from_args
    from triaxis.plan.runtimes import RUNTIMES

    shape = shape_from_args(PRESETS["tiny"], "tiny")
    per_token = op_saved_bytes_per_token(shape, RUNTIMES["triaxis"], 1, 4)  # fp32 on CPU
    (op, _), (full, _) = _measure(base, "op"), _measure(base, "full")
    assert op - full == 4 * per_token * 2 * 32


@pytest.fixture(scope="module")
def problem():
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Problem, load_model
    from triaxis.plan.runtimes import RUNTIMES

    shape, _ = load_model("8b")
    hw = resolve_hardware(load_catalog(), "h100", "p5")
    return Problem(shape, hw, RUNTIMES["triaxis"], 4096, 256)


def test_planner_costs_op_level_between_none_and_full(problem):
    from triaxis.plan.problem import Layout
    from triaxis.plan.search import evaluate

    plans = {ac: evaluate(problem, Layout(1, 32, 2, 1, 1, ac)) for ac in ("none", "op", "full")}
    mem = {ac: p.memory.activations for ac, p in plans.items()}
    step = {ac: p.time.total for ac, p in plans.items()}
    assert mem["full"] < mem["op"] < mem["none"], mem
    assert step["none"] < step["op"] < step["full"], step
    # Op-level reruns no projection: its extra time is a fraction of full's.
    assert step["op"] - step["none"] < 0.5 * (step["full"] - step["none"]), step


def test_every_checkpointing_option_the_planner_emits_runs_in_the_trainer(problem):
    """Each (checkpointing, offload) the search enumerates becomes [parallel] fields that pass
    the trainer's validation and select the matching wrapping."""
    from triaxis.config import load_config, validate
    from triaxis.plan.search import SearchSpace, enumerate_layouts

    seen = set()
    for layout in enumerate_layouts(problem.shape, 16, 8, 256, SearchSpace(max_pp=1)):
        key = (layout.activation_checkpoint, layout.ac_every, layout.offload_checkpoints)
        if key in seen:
            continue
        seen.add(key)
        fields = layout.runtime_ac()
        cfg = load_config(None, [f"--parallel.{k}={str(v).lower()}" for k, v in fields.items()])
        validate(cfg)
        p = cfg.parallel
        blocks = checkpointed_blocks(32, p.activation_checkpoint, p.ac_selective, p.ac_every)
        want = {"none": 0, "selective": 32 // layout.ac_every}.get(layout.activation_checkpoint, 32)
        assert len(blocks) == want, (layout.describe(), fields)
        assert p.activation_offload == layout.offload_checkpoints
    assert {k[0] for k in seen} == {"none", "selective", "op", "full"}
    assert ("full", 2, True) in seen


def test_offload_fetches_each_input_once_and_prefetches_within_a_pass(base, monkeypatch):
    """Backward fetches a block's input together with the previous block's (the next one
    backward needs); each comes back exactly once, and a new forward pass (micro-batch) starts
    a new chain, so no pass prefetches another's input."""
    from triaxis.parallel.activations import ActivationOffload

    copies, prefetched = [], []
    fetch, unpack = ActivationOffload._fetch, ActivationOffload._unpack

    def counting_fetch(self, saved):
        if saved.gpu is None:
            copies.append(saved)
        fetch(self, saved)

    def counting_unpack(self, saved):
        if not isinstance(saved, torch.Tensor):  # the rope table passes through as it is
            prefetched.append(saved.gpu is not None)  # on its way before backward asked
        return unpack(self, saved)

    monkeypatch.setattr(ActivationOffload, "_fetch", counting_fetch)
    monkeypatch.setattr(ActivationOffload, "_unpack", counting_unpack)
    model, hooks = _model(base, "full_offload")
    losses = [_loss(model, base[1]) for _ in range(2)]  # two micro-batches, then backward
    sum(losses).backward()
    assert hooks.num_offloaded == 8 and len(copies) == 8 and len(set(map(id, copies))) == 8
    # Per pass: the last block's input is fetched on demand, the other three were prefetched.
    assert sorted(prefetched) == [False] * 2 + [True] * 6, prefetched
