"""Every layout trains the same model as one process: losses per step and final parameters."""

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

_refs: dict = {}


def reference(data, tmp_path_factory, micro_batch: int, **extra) -> dict:
    """The single-process run over the same global batch (cached per micro-batch)."""
    key = (micro_batch, tuple(sorted(extra.items())))
    if key not in _refs:
        run_dir = str(tmp_path_factory.mktemp("ref"))
        _refs[key] = train_collect(
            0, 1, data, run_dir, {"train__micro_batch": micro_batch, **extra}
        )
    return _refs[key]


# (world, degrees) — the parity matrix of the issue: pure DP, MiCS sharding, HSDP, TP, TP x FSDP.
LAYOUTS = {
    "dp_replicate2": (2, {"parallel__dp_replicate": 2, "parallel__dp_shard": 1}),
    "dp_shard2": (2, {"parallel__dp_shard": 2}),
    "dp_shard4": (4, {"parallel__dp_shard": 4}),
    "replicate2_shard2": (4, {"parallel__dp_replicate": 2, "parallel__dp_shard": 2}),
    "tp2": (2, {"parallel__tp": 2, "parallel__dp_shard": 1}),
    "tp2_shard2": (4, {"parallel__tp": 2, "parallel__dp_shard": 2}),
}


def by_world(name: str, world: int):
    """A case; world 4 is slow (the fast lane keeps world 2 of every kind of layout)."""
    return pytest.param(name, marks=pytest.mark.slow) if world > 2 else name


def dp_size(degrees: dict, world: int) -> int:
    return world // degrees.get("parallel__tp", 1)


@pytest.mark.parametrize("accum", [1, 2], ids=["no_accum", "accum2"])
@pytest.mark.parametrize("layout", [by_world(name, world) for name, (world, _) in LAYOUTS.items()])
def test_layout_matches_single_process(layout, accum, byte_data, tmp_path, tmp_path_factory):
    world, degrees = LAYOUTS[layout]
    dp = dp_size(degrees, world)
    micro = 8 // (dp * accum)
    got = run_workers(
        train_collect, world, byte_data, str(tmp_path), {**degrees, "train__micro_batch": micro}
    )
    ref = reference(byte_data, tmp_path_factory, 8 // accum)
    assert_same_run(got[0], ref)


VARIANTS = {
    "full_ac": (2, {"parallel__dp_shard": 2, "parallel__activation_checkpoint": "full"}),
    "selective_ac_tp": (
        4,
        {
            "parallel__tp": 2,
            "parallel__dp_shard": 2,
            "parallel__activation_checkpoint": "selective",
            "parallel__ac_every": 2,
        },
    ),
    "cpu_offload": (2, {"parallel__dp_shard": 2, "parallel__cpu_offload": "true"}),
    "zero2_no_reshard": (2, {"parallel__dp_shard": 2, "parallel__reshard_after_forward": "false"}),
    "loss_parallel": (
        2,
        {"parallel__tp": 2, "parallel__dp_shard": 1, "parallel__loss_parallel": "true"},
    ),
    "untied_hsdp_ac": (
        4,
        {
            "parallel__dp_replicate": 2,
            "parallel__dp_shard": 2,
            "parallel__activation_checkpoint": "full",
            "model__tie_embeddings": "false",
        },
    ),
}


@pytest.mark.parametrize(
    "variant", [by_world(name, world) for name, (world, _) in VARIANTS.items()]
)
def test_variant_matches_single_process(variant, byte_data, tmp_path, tmp_path_factory):
    world, degrees = VARIANTS[variant]
    dp = dp_size(degrees, world)
    extra = (
        {"model__tie_embeddings": degrees["model__tie_embeddings"]}
        if "model__tie_embeddings" in degrees
        else {}
    )
    # Two micro-batches per step, so the gradient-accumulation path is exercised too.
    got = run_workers(
        train_collect,
        world,
        byte_data,
        str(tmp_path),
        {**degrees, "train__micro_batch": 8 // (dp * 2)},
    )
    assert_same_run(got[0], reference(byte_data, tmp_path_factory, 4, **extra))


def test_fsdp_wrapping_at_world_1_is_numerically_a_no_op(byte_data, tmp_path, tmp_path_factory):
    """parallel.fsdp_always wraps a single rank (the bench measures its cost): same training."""
    got = run_workers(
        train_collect,
        1,
        byte_data,
        str(tmp_path),
        {"parallel__fsdp_always": "true", "train__micro_batch": 4},
    )
    assert_same_run(got[0], reference(byte_data, tmp_path_factory, 4))


@pytest.mark.slow
def test_fsdp_autocast_at_world_1_has_the_single_process_bf16_numerics(
    byte_data, tmp_path, tmp_path_factory
):
    """parallel.fsdp_autocast: fp32 parameters under FSDP, bf16 compute from autocast, so the
    GPU bench's FSDP row computes what the plain bf16 row does (FSDP's bf16 policy would run a
    bf16 residual stream instead: a different computation, not the wrapper's cost)."""
    bf16 = {"train__dtype": "bf16"}
    got = run_workers(
        train_collect,
        1,
        byte_data,
        str(tmp_path),
        {"parallel__fsdp_always": "true", "parallel__fsdp_autocast": "true",
         "train__micro_batch": 4, **bf16},
    )  # fmt: skip
    assert_same_run(got[0], reference(byte_data, tmp_path_factory, 4, **bf16))


@pytest.mark.slow
def test_per_block_compile_matches_eager(byte_data, tmp_path, tmp_path_factory):
    """train.compile wraps each block in torch.compile (aot_eager here: the graph capture and
    autograd path without a C++ toolchain's compile time) and trains the same model."""
    got = run_workers(
        train_collect,
        2,
        byte_data,
        str(tmp_path),
        {
            "parallel__dp_shard": 2,
            "train__compile": "true",
            "train__compile_backend": "aot_eager",
            "train__micro_batch": 4,
        },
    )
    assert_same_run(got[0], reference(byte_data, tmp_path_factory, 8))


def test_fused_chunked_loss_under_fsdp_matches_plain_loss(byte_data, tmp_path, tmp_path_factory):
    """The fused head + loss in chunks of 24 tokens (micro-batches of 2 x 32: three chunks, the
    last one short) under dp_shard=2 trains exactly as one process with full logits."""
    got = run_workers(
        train_collect,
        2,
        byte_data,
        str(tmp_path),
        {"parallel__dp_shard": 2, "train__micro_batch": 2, "train__loss_chunk_tokens": 24},
    )
    assert_same_run(got[0], reference(byte_data, tmp_path_factory, 4, train__loss_chunk_tokens=0))
