"""The mixture-of-experts block (triaxis.model.moe) against a per-token reference, its balancing,
and single-process training with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from triaxis.config import load_config
from triaxis.errors import UserError
from triaxis.model import PRESETS, build_model_args, param_counts
from triaxis.model import moe as moe_mod
from triaxis.model.llama import FeedForward, Transformer
from triaxis.model.moe import MoE, update_expert_bias


def _args(**kw):
    return dataclasses.replace(PRESETS["tiny-moe"], **kw)


def _moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    m = MoE(_args(**kw))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def _reference(m: MoE, x: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """Token by token, slot by slot: each kept (token, expert) pair's SwiGLU, weighted; an
    expert takes assignments in token order until `capacity` (0: no limit)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(flat @ m.router.gate.weight.T, -1)
    chosen = torch.topk(probs + m.router.expert_bias, m.top_k, -1).indices
    w = probs.gather(-1, chosen)
    w = w / w.sum(-1, keepdim=True)
    taken = [0] * m.n_experts
    out = torch.zeros_like(flat)
    ex = m.experts
    for t in range(flat.shape[0]):
        for s in range(m.top_k):
            e = int(chosen[t, s])
            taken[e] += 1
            if capacity and taken[e] > capacity:
                continue
            h = F.silu(flat[t] @ ex.w1[e]) * (flat[t] @ ex.w3[e])
            out[t] += w[t, s] * (h @ ex.w2[e])
    if m.shared is not None:
        out = out + m.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("grouped", [True, False])
def test_dropless_moe_equals_the_per_token_reference(grouped, monkeypatch):
    monkeypatch.setattr(moe_mod, "grouped_mm_supported", lambda device, dtype: grouped)
    m = _moe()
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-5, rtol=1e-5)
    assert int(m.stats["dropped"]) == 0
    assert float(m.stats["load_mean"]) == 2 * 7 * 2 / 4  # tokens x k / experts


def test_capacity_drops_the_late_assignments_and_counts_them():
    m = _moe(moe_capacity_factor=0.5, n_shared_experts=0)
    x = torch.randn(2, 8, 64)
    capacity = m.capacity(16)
    assert capacity == 4  # ceil(0.5 x 16 x 2 / 4)
    torch.testing.assert_close(m(x), _reference(m, x, capacity), atol=1e-5, rtol=1e-5)
    counts = torch.zeros(4).scatter_add_(
        0, torch.topk(m.router(x.view(-1, 64))[0], 2, -1).indices.flatten(), torch.ones(32)
    )
    assert int(m.stats["dropped"]) == int((counts - capacity).clamp(min=0).sum()) > 0


def test_aux_loss_enters_the_gradient_as_coef_times_aux():
    coef = 0.5
    m = _moe(moe_aux_loss_coef=coef)
    x = torch.randn(2, 5, 64)
    m(x).sum().backward()
    with_aux = m.router.gate.weight.grad.clone()
    m.zero_grad()
    m.aux_loss_coef = 0.0
    out = m(x)
    (out.sum() + coef * m.stats["aux_loss"]).backward()  # stats hold it detached: no gradient
    plain = m.router.gate.weight.grad.clone()
    m.zero_grad()
    # The explicit sum: out + coef * aux, aux recomputed with its graph.
    flat = x.view(-1, 64)
    probs, chosen, _ = m.router(flat)
    counts = torch.zeros(4).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
    aux = 4 * (counts / chosen.numel() * probs.mean(0)).sum()
    (m(x).sum() + coef * aux).backward()
    torch.testing.assert_close(with_aux, m.router.gate.weight.grad, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(with_aux, plain)  # the aux term changes the gradient


def test_a_step_the_numerics_guard_skips_leaves_the_bias_and_drops_its_counts():
    m = _moe(n_shared_experts=0, moe_bias_update_rate=0.1)
    m.train()
    m(torch.randn(4, 8, 64))
    update_expert_bias(m, rate=0.1, skip=torch.tensor(1.0))
    assert m.router.expert_bias.abs().sum() == 0 and m.router.tokens_since_update.sum() == 0
    m(torch.randn(4, 8, 64))
    update_expert_bias(m, rate=0.1, skip=torch.tensor(0.0))
    assert m.router.expert_bias.abs().sum() > 0


def test_without_aux_free_balancing_nothing_is_counted():
    """Nothing reads the counts then: kept, each data-parallel rank's would differ and be saved
    in its checkpoints."""
    m = _moe(n_shared_experts=0)
    m.train()
    m(torch.randn(4, 8, 64))
    assert m.router.tokens_since_update.sum() == 0
    m = _moe(n_shared_experts=0, moe_bias_update_rate=0.1)
    m.train()
    m(torch.randn(4, 8, 64))
    assert m.router.tokens_since_update.sum() == 4 * 8 * 2


def test_bias_steers_the_choice_not_the_weights_and_moves_toward_balance():
    m = _moe(n_shared_experts=0)
    x = torch.randn(4, 8, 64)
    m.train()
    m(x)
    counts = m.router.tokens_since_update.clone()
    update_expert_bias(m, rate=0.1)
    expected = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(m.router.expert_bias, expected)
    assert m.router.tokens_since_update.sum() == 0
    # A large bias on expert 3 sends every token there, at the router's own probability.
    m.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    probs, chosen, weights = m.router(x.view(-1, 64))
    assert (chosen == 3).any(-1).all()
    raw = probs.gather(-1, chosen)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))


def test_first_blocks_dense_and_counts_match_the_model():
    a = PRESETS["tiny-moe"]
    model = Transformer(a)
    assert isinstance(model.layers["0"].feed_forward, FeedForward)
    assert all(isinstance(model.layers[str(i)].feed_forward, MoE) for i in (1, 2, 3))
    assert param_counts(a)["total"] == sum(p.numel() for p in model.parameters())
    # Active parameters: 2 of 4 experts per MoE block.
    expert = 3 * a.dim * a.moe_ffn_dim
    dense = param_counts(dataclasses.replace(a, n_experts=0))
    extra = 3 * (a.dim * 4 + expert - 3 * a.dim * a.ffn_dim + 2 * expert)
    assert param_counts(a)["flops_params"] == dense["flops_params"] + extra


def test_init_is_seeded_by_name_and_zeroes_the_balancing_state():
    def build():
        with torch.device("meta"):
            model = Transformer(PRESETS["tiny-moe"])
        model.materialize("cpu")
        model.init_weights(3)
        return model

    a, b = build(), build()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    router = a.layers["1"].feed_forward.router
    assert router.expert_bias.abs().sum() == 0 and router.tokens_since_update.sum() == 0
    assert "layers.1.feed_forward.router.expert_bias" in a.state_dict()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--model.moe_top_k=5"], "model.moe_top_k=5 must be between 1 and model.n_experts=4"),
        (["--model.moe_first_dense=4"], "model.moe_first_dense=4 leaves no MoE block"),
    ],
)
def test_bad_moe_shapes_are_one_line(overrides, words):
    cfg = load_config(None, ["--model.preset=tiny-moe", *overrides])
    with pytest.raises(UserError) as err:
        build_model_args(cfg.model)
    assert words in str(err.value) and "\n" not in str(err.value)


def _train(byte_data, run_dir, steps: int, **extra: str):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    values = {
        "model.preset": "tiny-moe",
        "data.path": byte_data,
        "data.seq_len": "32",
        "train.steps": str(steps),
        "train.lr": "3e-3",
        "train.warmup_steps": "2",
        "train.global_batch": "8",
        "train.micro_batch": "4",
        "train.device": "cpu",
        "train.run_dir": str(run_dir),
        "train.val_every": "0",
        "checkpoint.interval": "0",
        "checkpoint.save_final": "false",
        "metrics.log_every": "1",
        "metrics.tensorboard": "false",
        "metrics.progress": "false",
        **extra,
    }
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    trainer = Trainer(cfg, init_distributed("cpu"))
    return trainer, trainer.fit()


def test_single_process_training_learns_and_balances(byte_data, tmp_path):
    trainer, result = _train(
        byte_data, tmp_path / "run", 12, **{"model.moe_bias_update_rate": "1e-3"}
    )
    losses = list(result.losses.values())
    assert losses[-1] < losses[0] - 0.3, losses
    layers = moe_mod.moe_layers(trainer.model)
    assert len(layers) == 3 and all(m.aux_scale == 0.5 for _, m in layers)  # 2 micro-batches
    # The bias moved every step, the counts restarted after the last one.
    for _, m in layers:
        assert m.router.expert_bias.abs().sum() > 0
        assert m.router.tokens_since_update.sum() == 0


def test_metrics_carry_each_blocks_load_aux_loss_and_drops(byte_data, tmp_path):
    import json

    _train(byte_data, tmp_path / "run", 3, **{"model.moe_capacity_factor": "0.5"})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert set(r) >= {f"{s}/{i}" for s in moe_mod.STAT_NAMES for i in (1, 2, 3)}
        assert "moe_load_max/0" not in r  # block 0 is dense
        # 4 x 32 tokens x 2 / 4 experts per micro-batch; capacity 0.5 drops some.
        assert r["moe_load_mean/1"] == 64.0 and r["moe_load_max/1"] >= 64.0
        assert 0 < r["moe_dropped/1"] < 1 and r["moe_aux_loss"] > 0


@pytest.mark.parametrize("capacity", ["0", pytest.param("1.0", marks=pytest.mark.slow)])
def test_no_host_sync_between_log_steps_with_moe(capacity, byte_data, tmp_path):
    from tests.test_host_sync import _assert_no_sync_outside, _count

    extra = {
        "model.preset": "tiny-moe",
        "model.moe_capacity_factor": capacity,
        "model.moe_bias_update_rate": "1e-3",
        "train.micro_batch": "4",
    }
    by_step = _count(0, 1, byte_data, str(tmp_path / "run"), extra)
    _assert_no_sync_outside(by_step)


@pytest.mark.parametrize(
    "first, then, words",
    [
        (
            "tiny-moe",
            "tiny",
            "holds a mixture of experts (model.n_experts=4) and this run builds a dense",
        ),
        pytest.param(
            "tiny",
            "tiny-moe",
            "holds a dense model and this run builds a mixture of experts",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_moe_checkpoint_into_a_dense_run_and_back_is_one_line(
    first, then, words, byte_data, tmp_path
):
    run = tmp_path / "run"
    _train(byte_data, run, 2, **{"model.preset": first, "checkpoint.save_final": "true"})
    with pytest.raises(UserError) as err:
        _train(byte_data, run, 4, **{"model.preset": then})
    assert words in str(err.value) and "\n" not in str(err.value)
    # A training knob (not a shape) may change on resume.
    _train(byte_data, run, 3, **{"model.preset": first, "model.moe_capacity_factor": "2.0"})


def test_resume_is_exact_with_the_routing_bias(byte_data, tmp_path):
    knobs = {"model.moe_bias_update_rate": "1e-2", "checkpoint.save_final": "true"}
    straight, whole = _train(byte_data, tmp_path / "a", 4, **knobs)
    _train(byte_data, tmp_path / "b", 2, **knobs)
    resumed, rest = _train(byte_data, tmp_path / "b", 4, **knobs)
    assert rest.losses[4] == whole.losses[4]
    mine, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in mine.items())
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("capacity", ["0", pytest.param("0.75", marks=pytest.mark.slow)])
def test_moe_under_fsdp_matches_single_process(capacity, byte_data, tmp_path):
    """dp_shard=2 against one process over the same micro-batches of 2 samples (the aux loss
    and the capacity are per micro-batch), aux loss, bias balancing and capacity on."""
    from tests.dist import run_workers
    from tests.parity import assert_same_run, train_collect

    moe = {
        "model__preset": "tiny-moe",
        "model__moe_bias_update_rate": "1e-2",
        "model__moe_capacity_factor": capacity,
        "train__micro_batch": 2,
    }
    ref = train_collect(0, 1, byte_data, str(tmp_path / "ref"), moe)
    got = run_workers(
        train_collect, 2, byte_data, str(tmp_path / "got"), {**moe, "parallel__dp_shard": 2}
    )
    assert_same_run(got[0], ref)


def test_moe_with_full_activation_checkpointing_matches_without(byte_data, tmp_path):
    """The recomputed forward must not count twice: the bias, the aux gradient, the figures."""
    from tests.parity import assert_same_run, train_collect

    moe = {"model__preset": "tiny-moe", "model__moe_bias_update_rate": "1e-2"}
    ref = train_collect(0, 1, byte_data, str(tmp_path / "ref"), moe)
    ac = {**moe, "parallel__activation_checkpoint": "full"}
    assert_same_run(train_collect(0, 1, byte_data, str(tmp_path / "ac"), ac), ref)


def test_export_hf_of_an_moe_checkpoint_is_refused_in_one_line(byte_data, tmp_path):
    from triaxis.hf.exporter import export_hf

    _train(byte_data, tmp_path / "run", 1, **{"checkpoint.save_final": "true"})
    with pytest.raises(UserError) as err:
        export_hf(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"))
    assert "cannot express model.n_shared_experts=1" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()
