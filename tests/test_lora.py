"""LoRA: frozen base, adapter-only optimizer, every layout equal to one process."""

import pytest
import torch

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from triaxis.errors import UserError

LORA = {
    "lora__enabled": "true",
    "lora__rank": 4,
    "lora__alpha": 8,
    # Column-wise (wq, w1) and row-wise (wo, w2) bases under TP; a higher lr moves the adapters.
    "lora__targets": "attention.wq,attention.wo,feed_forward.w1,feed_forward.w2",
    "train__lr": "1e-2",
}


_refs: dict = {}


def test_base_frozen_and_optimizer_holds_adapters_only(byte_data, tmp_path, tmp_path_factory):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(byte_data, str(tmp_path), **LORA, train__micro_batch=4)
    trainer = Trainer(cfg, init_distributed("cpu"))
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    adapters = {k for k in before if ".lora_" in k}
    assert len(adapters) == 2 * 4 * trainer.model.args.n_layers
    for k, v in before.items():
        if k in adapters:
            continue
        assert torch.equal(v, after[k]), f"frozen base weight {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in adapters if "lora_b" in k)
    # AdamW keeps two moments per trained element: twice the adapters' bytes, nothing more.
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in before.items() if k in adapters)
    optim_bytes = sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.ndim > 0
    )
    assert optim_bytes == 2 * adapter_bytes
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in trainer.model.named_parameters() if ".lora_" in n
    }


LAYOUTS = {
    "dp_shard2": (2, {"parallel__dp_shard": 2}),
    "tp2": (2, {"parallel__tp": 2, "parallel__dp_shard": 1}),
    "pp2": (
        2,
        {"parallel__pp": 2, "parallel__dp_shard": 1, "model__tie_embeddings": "false"},
    ),
}


def _layout_case(layout: str):
    """A case of the parity matrix; the slow ones are marked (CPU compile takes minutes)."""
    return pytest.param(layout, marks=pytest.mark.slow) if layout in SLOW else layout


LAYOUTS["ac_compile_shard2"] = (
    2,
    {
        "parallel__dp_shard": 2,
        "parallel__activation_checkpoint": "full",
        "train__compile": "true",
        "train__compile_backend": "aot_eager",
    },
)
SLOW = {"ac_compile_shard2"}


@pytest.mark.parametrize("layout", [_layout_case(name) for name in LAYOUTS])
def test_lora_layout_matches_single_process(layout, byte_data, tmp_path, tmp_path_factory):
    world, degrees = LAYOUTS[layout]
    dp = world // (degrees.get("parallel__tp", 1) * degrees.get("parallel__pp", 1))
    micro = 8 // (dp * 2)
    got = run_workers(
        train_collect,
        world,
        byte_data,
        str(tmp_path),
        {**LORA, **degrees, "train__micro_batch": micro},
    )
    ref_over = (
        {"model__tie_embeddings": degrees["model__tie_embeddings"]}
        if "model__tie_embeddings" in degrees
        else {}
    )
    key = (4, tuple(ref_over.items()))
    if key not in _refs:
        _refs[key] = train_collect(
            0,
            1,
            byte_data,
            str(tmp_path_factory.mktemp("lora_ref")),
            {**LORA, **ref_over, "train__micro_batch": 4},
        )
    ref = _refs[key]
    merged = dict(got[0]["params"])
    for r in got[1:]:
        merged.update(r["params"])
    assert_same_run({**got[0], "params": merged}, ref)
    if degrees.get("parallel__dp_shard") == 2:
        # Each rank holds half of the adapters' optimizer state (their dim 0 splits evenly).
        assert [r["bytes"]["optim"] for r in got] == [ref["bytes"]["optim"] // 2] * 2
    # The planner's price: AdamW's two fp32 moments of this rank's adapters (each rank of
    # these layouts is its own stage, tp or dp_shard coordinate).
    for rank, r in enumerate(got):
        assert r["bytes"]["optim"] == 8 * planned_adapter_numel(degrees, rank), rank
    for name, p in ref["params"].items():
        if ".lora_" not in name:  # the frozen base: bit-identical in every layout
            assert torch.equal(merged[name], p), name


@pytest.mark.parametrize(
    "override, words",
    [
        ({"lora__targets": "attention.nope"}, "'attention.nope' matches no Linear"),
        ({"lora__rank": 0}, "lora.rank=0"),
        ({"lora__alpha": 0}, "lora.alpha=0"),
        ({"lora__targets": "output", "parallel__tp": 2}, "adapts the LM head"),
    ],
)
def test_bad_lora_input_is_one_line(override, words, byte_data, tmp_path):
    from triaxis.model.presets import build_model_args
    from triaxis.parallel.rules import check_layout

    with pytest.raises(UserError) as err:
        cfg = make_config(byte_data, str(tmp_path), **{**LORA, "parallel__dp_shard": 1, **override})
        check_layout(cfg, cfg.parallel.tp, build_model_args(cfg.model, 256))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # two runs of processes; the parity matrix is the fast lane
def test_lora_checkpoint_from_dp_shard2_resumes_at_world_1(byte_data, tmp_path):
    """Adapters and their optimizer state saved at dp_shard=2 resume in one process: the
    losses and final weights equal one uninterrupted single-process run."""
    common = {**LORA, "train__steps": 6, "train__micro_batch": 4}
    ref = train_collect(0, 1, byte_data, str(tmp_path / "ref"), common)
    saving = {
        **common,
        "checkpoint__dir": str(tmp_path / "ckpt"),
        "checkpoint__interval": 3,
        "train__exit_after_steps": 3,
    }
    first = run_workers(
        train_collect, 2, byte_data, str(tmp_path / "run"), {**saving, "train__micro_batch": 2}
    )
    second = run_workers(train_collect, 1, byte_data, str(tmp_path / "run"), saving)
    assert sorted(first[0]["losses"]) == [1, 2, 3] and sorted(second[0]["losses"]) == [4, 5, 6]
    got = {**second[0], "losses": {**first[0]["losses"], **second[0]["losses"]}}
    assert_same_run(got, ref)


def planned_adapter_numel(degrees: dict, rank: int) -> int:
    from triaxis.config import load_config
    from triaxis.model.presets import build_model_args
    from triaxis.parallel.lora import patterns
    from triaxis.plan.lora import adapter_numel
    from triaxis.plan.problem import LoraPlan, shape_from_args

    cfg = load_config(
        None,
        [
            "--model.preset=tiny",
            f"--lora.rank={LORA['lora__rank']}",
            f"--lora.targets={LORA['lora__targets']}",
        ],
    )
    shape = shape_from_args(build_model_args(cfg.model, 256), "tiny")
    tp, pp = degrees.get("parallel__tp", 1), degrees.get("parallel__pp", 1)
    shard = degrees.get("parallel__dp_shard", 1)
    # Rank 1 of tp/dp_shard=2 holds the same sizes as rank 0 here (every split is even).
    stage = rank if pp > 1 else 0
    lora = LoraPlan(cfg.lora.rank, tuple(patterns(cfg.lora)))
    return adapter_numel(shape, lora, tp, shard, pp, stage)[0]


def test_planner_prices_the_frozen_base():
    """Gradients and AdamW states of the adapters only; the base's parameters stay."""
    from triaxis.plan.lora import lora_states
    from triaxis.plan.memory import memory_of
    from triaxis.plan.problem import Layout, LoraPlan

    full = _tiny_problem(None)
    lora = _tiny_problem(LoraPlan(4, ("attention.wq",)))
    layout = Layout(dp_replicate=1, dp_shard=1, tp=1, pp=1, micro_batch=1)
    a, b = memory_of(full, layout, 1), memory_of(lora, layout, 1)
    numel = 4 * (64 + 64) * full.shape.n_layers  # A (4, 64) + B (64, 4) per block
    assert b.params == a.params + 4 * numel
    assert b.grads == 4 * numel and b.optim == 8 * numel + 4 * 2 * full.shape.n_layers
    assert lora_states(full.shape, lora.lora, 1, 1, 1, 0, 0.0)[1] == 4 * numel


def _tiny_problem(lora):
    from triaxis.model.presets import PRESETS
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Problem, shape_from_args
    from triaxis.plan.runtimes import RUNTIMES

    shape = shape_from_args(PRESETS["tiny"], "tiny")
    hw = resolve_hardware(load_catalog(), "h100", "p5")
    return Problem(shape, hw, RUNTIMES["triaxis"], 32, 8, lora=lora)
