import pytest

from triaxis.config import SECTIONS, field_docs, load_config, parse_overrides, to_toml, validate
from triaxis.errors import UserError
from triaxis.model import build_model_args
from triaxis.parallel.dims import ParallelDims


def test_toml_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 7\nlr = 0.5\n[parallel]\ntp = 2\n")
    cfg = load_config(
        str(f), ["--train.steps=9", "--parallel.cpu_offload", "true", "--data.path=x"]
    )
    assert (cfg.train.steps, cfg.train.lr, cfg.parallel.tp) == (9, 0.5, 2)
    assert cfg.parallel.cpu_offload is True and cfg.data.path == "x"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.steps=3", "--model.tie_embeddings=false"])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    assert load_config(str(f)) == cfg


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError, match=r"train\.stesp.*did you mean train\.steps"):
        load_config(None, ["--train.stesp=3"])
    with pytest.raises(UserError, match=r"did you mean \[parallel\]"):
        load_config(None, ["--paralel.tp=2"])


def test_wrong_type_names_value_and_fix():
    with pytest.raises(UserError, match=r"train\.steps='many' must be int"):
        load_config(None, ["--train.steps=many"])
    with pytest.raises(UserError, match=r"must be a boolean"):
        load_config(None, ["--parallel.cpu_offload=maybe"])
    with pytest.raises(UserError, match=r"not a valid choice.*\['none', 'full', 'selective'\]"):
        load_config(None, ["--parallel.activation_checkpoint=some"])


def test_bad_override_syntax():
    with pytest.raises(UserError, match="--section.field=value"):
        parse_overrides(["steps=3"])


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        assert set(docs) == set(cls.__dataclass_fields__), cls.__name__
        assert all(len(d) > 10 for d in docs.values())


def test_seq_len_over_model_maximum():
    cfg = load_config(None, ["--model.preset=tiny", "--data.seq_len=4096"])
    with pytest.raises(UserError, match=r"data\.seq_len=4096 is over .* max_seq_len=256"):
        validate(cfg, build_model_args(cfg.model))


def test_global_batch_must_divide():
    cfg = load_config(None, ["--train.global_batch=10", "--train.micro_batch=4"])
    with pytest.raises(UserError, match=r"global_batch=10 is not a multiple of .* = 8"):
        validate(cfg, None, ParallelDims(1, 2, 1, 1, 2))


def test_parallel_dims_validation():
    assert ParallelDims(2, -1, 2, 1, 16).dp_shard == 4
    with pytest.raises(UserError, match=r"1 x 2 x 2 x 1 x 1 = 4 but the world size is 8"):
        ParallelDims(2, 2, 1, 1, 8)
    with pytest.raises(UserError, match=r"x cp x tp = 1 x 1 x 1 x 2 x 1 = 2 but the world size"):
        ParallelDims(1, 1, 1, 1, 8, cp=2)
    with pytest.raises(UserError, match=r"parallel\.cp=0 must be >= 1"):
        ParallelDims(1, -1, 1, 1, 8, cp=0)
    assert ParallelDims(1, -1, 2, 1, 16, cp=2).dp_shard == 4
    with pytest.raises(UserError, match=r"not divisible by dp_replicate x tp x pp x cp"):
        ParallelDims(1, -1, 3, 1, 8)
    with pytest.raises(UserError, match=r"parallel\.tp=0 must be >= 1"):
        ParallelDims(1, -1, 0, 1, 8)
    with pytest.raises(UserError, match=r"choose tp in \[1, 2, 4, 8\]"):
        ParallelDims(1, 1, 16, 1, 16).check_model(n_heads=32, n_kv_heads=8, n_layers=16)


def test_mesh_order_puts_tp_innermost_then_partition_group():
    dims = ParallelDims(dp_replicate=2, dp_shard=2, tp=2, pp=1, world_size=8)
    coords = [dims.coords(r) for r in range(8)]
    assert [c["tp"] for c in coords[:2]] == [0, 1]
    assert [c["dp_shard"] for c in coords[:4]] == [0, 0, 1, 1]
    assert [c["dp_replicate"] for c in coords] == [0] * 4 + [1] * 4
    assert [dims.dp_rank(r) for r in range(0, 8, 2)] == [0, 1, 2, 3]


def test_mesh_order_puts_cp_between_tp_and_partition_group():
    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=2, pp=1, world_size=8, cp=2)
    coords = [dims.coords(r) for r in range(8)]
    assert [c["tp"] for c in coords[:2]] == [0, 1]
    assert [c["cp"] for c in coords[:4]] == [0, 0, 1, 1]
    assert [c["dp_shard"] for c in coords] == [0] * 4 + [1] * 4
    # cp ranks read the same samples; FSDP shards over dp_shard x cp; losses average over both.
    assert [dims.dp_rank(r) for r in (0, 2, 4, 6)] == [0, 0, 1, 1]
    assert (dims.shard_size, dims.loss_ranks, dims.fsdp_enabled) == (4, 4, True)


def test_model_fields_unset_are_none_and_round_trip(tmp_path):
    """An unset [model] field is None (not 0 or ""): left out of the resolved TOML, None again
    when it is read back, and taken from the preset (or the data's vocabulary)."""
    cfg = load_config(None, ["--model.preset=tiny", "--model.dim=128"])
    m = cfg.model
    assert (m.n_layers, m.vocab_size, m.rope_theta, m.rope_scaling) == (None, None, None, None)
    text = to_toml(cfg)
    assert "dim = 128" in text and "n_layers" not in text and "rope_theta" not in text
    f = tmp_path / "config.toml"
    f.write_text(text)
    again = load_config(str(f))
    assert again == cfg and again.model.n_layers is None
    args = build_model_args(again.model, vocab_size=300)
    assert (args.dim, args.n_layers, args.vocab_size) == (128, 4, 300)
    pinned = load_config(None, ["--model.preset=tiny", "--model.vocab_size=1024"])
    assert build_model_args(pinned.model, vocab_size=300).vocab_size == 1024


def test_model_field_zero_is_a_value_not_unset():
    cfg = load_config(None, ["--model.preset=tiny", "--model.dim=none"])
    assert cfg.model.dim is None
    # An explicit 0 is a value, refused at the edge by the field's own range.
    with pytest.raises(UserError, match=r"model\.dim=0 must be >= 1"):
        load_config(None, ["--model.preset=tiny", "--model.dim=0"])
    with pytest.raises(UserError, match=r"model\.rope_theta=0\.0 must be > 0"):
        load_config(None, ["--model.preset=tiny", "--model.rope_theta=0"])
