"""Weighted mixtures (`[[data.sources]]`): sample i -> (source, index) is a pure function; any
window of samples holds each source within its stated bound of the weights; epochs caps end a
source and share its weight; resume is exact, also across a data-parallel change; an s3://
source reads what the local one does; the CLI trains on three sources and logs per-source
tokens and validation losses."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from tests.dist import run_workers
from triaxis.config import load_config
from triaxis.data.dataset import TokenDataset, micro_batch_start
from triaxis.data.mixture import MixtureDataset, open_train_data, source_tokens
from triaxis.data.mixture_order import build_phases
from triaxis.errors import UserError

# -- the assignment alone --------------------------------------------------------------------


class _Stub:
    """A source that only counts: the index arithmetic needs no data."""

    manifest, seq_len = {}, 1


def assigned(weights, caps, n: int) -> tuple[MixtureDataset, list[tuple[int, int]]]:
    ds = MixtureDataset([_Stub()] * len(weights), weights, list("abcdefgh"), caps)
    return ds, [ds.locate(i) for i in range(n)]


def random_weights(rng: random.Random, k: int) -> list[float]:
    return [rng.choice([rng.uniform(0.01, 1), rng.randint(1, 9), 1e-3]) for _ in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_assignment_is_pure_and_each_source_reads_its_samples_in_order(k):
    rng = random.Random(k)
    for _ in range(3):
        weights = random_weights(rng, k)
        ds, seq = assigned(weights, [None] * k, 3000)
        nxt = [0] * k
        for i, (s, idx) in enumerate(seq):
            assert idx == nxt[s], (i, s, idx)  # source s's samples 0, 1, 2, ... in turn
            nxt[s] += 1
            if i % 97 == 0:
                assert ds.counts(i + 1) == nxt  # the closed form agrees with counting
        # a pure function of i: a fresh object, and indices far out, asked out of order
        again, _ = assigned(weights, [None] * k, 0)
        for i in [10**12 + 5, 7, 2999, 10**15]:
            assert again.locate(i) == ds.locate(i)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_any_window_is_within_the_stated_bound(k):
    """|count of s in any window of L samples - L·p_s| < window_bound[s] <= ceil(log2 k), here
    over every window of the first 4000 samples and of 4000 samples from index 10^13."""
    rng = random.Random(100 + k)
    for _ in range(3):
        weights = random_weights(rng, k)
        p = np.array(weights) / sum(weights)
        ds, _ = assigned(weights, [None] * k, 0)
        assert max(ds.window_bound) <= math.ceil(math.log2(k))
        for base in (0, 10**13):
            counts = np.array([ds.counts(base + n) for n in range(4001)])
            counts -= counts[0]  # exact integers: floats near 10^13 lose the fraction
            for s in range(k):
                dev = counts[:, s] - np.arange(4001) * p[s]  # prefix deviation from base
                worst = dev.max() - dev.min()  # = max over windows [a, b) of |deviation|
                assert worst < ds.window_bound[s] + 1e-6, (weights, s, worst)
        # the share over a long stretch equals the weight (to within the bound)
        counts = np.array(ds.counts(10**9))
        assert np.all(np.abs(counts - 10**9 * p) < np.array(ds.window_bound) + 1e-6)


def test_epochs_cap_ends_a_source_and_shares_its_weight():
    ds, seq = assigned([2, 1, 1], [None, 40, None], 600)
    taken = [[k for s, k in seq if s == src] for src in range(3)]
    assert taken[1] == list(range(40))  # exactly its cap, each sample once
    end = max(i for i, (s, _) in enumerate(seq) if s == 1) + 1
    assert ds.phases[1].start == end
    # after it: sources 0 and 2 in the ratio 2:1, within one sample over any window
    after = [s for s, _ in seq[end:]]
    dev = np.cumsum([1 if s == 0 else 0 for s in after]) - np.arange(1, len(after) + 1) * 2 / 3
    assert dev.max() - dev.min() < 1 and set(after) == {0, 2}
    # counts across phases agree with counting
    assert ds.counts(600) == [len(t) for t in taken]


def test_every_source_capped_makes_a_finite_mixture():
    ds, seq = assigned([1, 3], [25, 30], 55)
    assert ds.num_samples == 55
    assert sorted(seq) == [(0, k) for k in range(25)] + [(1, k) for k in range(30)]
    with pytest.raises(UserError, match="past the end of the mixture"):
        ds.locate(55)
    with pytest.raises(UserError, match="needs 56"):
        ds.check_length(56)
    assert [p.end for p in build_phases([1, 3], [25, 30])][-1] == 55


def test_resolved_config_round_trips(tmp_path):
    from triaxis.config import to_toml

    toml = tmp_path / "m.toml"
    toml.write_text(
        '[data]\nseq_len = 64\n[[data.sources]]\npath = "s3://b/web/"\nweight = 0.7\n'
        '[[data.sources]]\npath = "data/code"\nweight = 3\nepochs = 2\nname = "c"\n'
    )
    cfg = load_config(str(toml))
    assert [(s.label(), s.weight, s.epochs) for s in cfg.data.sources] == [
        ("web", 0.7, None),
        ("c", 3.0, 2.0),
    ]
    (tmp_path / "r.toml").write_text(to_toml(cfg))
    assert load_config(str(tmp_path / "r.toml")) == cfg  # and not refused for data.path


# -- over prepared data ----------------------------------------------------------------------

NAMES = ("prose", "code", "numbers")


def write_text(folder: Path, kind: str, n: int = 150) -> None:
    rng = random.Random(kind)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if kind == "prose":
            text = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(80))
        elif kind == "code":
            text = "\n".join(f"def f{j}(x):\n    return x * {j}" for j in range(rng.randint(5, 20)))
        else:
            text = " ".join(str(rng.randint(0, 10**6)) for _ in range(60))
        (folder / f"{i:04d}.txt").write_text(text)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Three prepared sources, one byte tokenizer: {name: folder}."""
    from triaxis.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name in NAMES:
        write_text(root / "raw" / name, name)
        opts = PrepareOptions(
            inputs=[str(root / "raw" / name)],
            output=str(root / name),
            tokenizer="byte",
            val_fraction=0.1,
            shard_tokens=8000,
            workers=1,
        )
        prepare(opts, log=lambda *_: None)
        out[name] = str(root / name)
    return out


def mixture_toml(path: Path, srcs: dict[str, str], weights=(5, 3, 2), **extra) -> str:
    lines = []
    for (name, folder), w in zip(srcs.items(), weights):
        lines += ["[[data.sources]]", f'path = "{folder}"', f"weight = {w}"]
        lines += [f"{k} = {v}" for k, v in extra.get(name, {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_samples_are_the_sources_own_and_any_reader_sees_the_same(sources, tmp_path):
    cfg_path = mixture_toml(tmp_path / "m.toml", sources)
    ds = open_train_data(load_config(cfg_path, ["--data.seq_len=32"]))
    assert isinstance(ds, MixtureDataset) and ds.names == list(NAMES)
    for i in [0, 1, 2, 3, 50, 10**9]:
        s, k = ds.locate(i)
        assert np.array_equal(ds.sample(i), ds.sources[s].sample(k))
    # one reader, or 4 data-parallel ranks with micro-batches of 2, read the same samples
    whole = ds.batch(16, 16).numpy()
    parts = [
        ds.batch(micro_batch_start(16, m, 2, 4, r), 2).numpy() for m in range(2) for r in range(4)
    ]
    order = [micro_batch_start(16, m, 2, 4, r) - 16 for m in range(2) for r in range(4)]
    for start, part in zip(order, parts):
        assert np.array_equal(whole[start : start + 2], part)
    # a second open gives the same samples; the sources' orders differ from each other's
    again = open_train_data(load_config(cfg_path, ["--data.seq_len=32"]))
    assert np.array_equal(again.batch(0, 64).numpy(), ds.batch(0, 64).numpy())
    assert len({ds.sources[s].seed for s in range(3)}) == 3
    reseeded = open_train_data(load_config(cfg_path, ["--data.seq_len=32", "--data.seed=7"]))
    assert [reseeded.locate(i) for i in range(64)] == [ds.locate(i) for i in range(64)]
    assert not np.array_equal(reseeded.batch(0, 64).numpy(), ds.batch(0, 64).numpy())
    # per-source tokens: from the cursor alone, dropped batches not counted
    got = source_tokens(ds, 80, {16}, 16)
    want = np.array(ds.counts(80)) - (np.array(ds.counts(32)) - ds.counts(16))
    assert got == {f"tokens/{n}": int(c) * 32 for n, c in zip(NAMES, want)}
    assert sum(got.values()) == (80 - 16) * 32


def test_epochs_cap_over_real_windows(sources, tmp_path):
    toml = mixture_toml(tmp_path / "m.toml", sources, numbers={"epochs": 0.5})
    cfg = load_config(toml, ["--data.seq_len=32", "--train.steps=1"])
    ds = open_train_data(cfg)
    cap = int(0.5 * ds.sources[2].num_windows)
    assert ds.caps == [None, None, cap]
    seen = [ds.locate(i) for i in range(ds.phases[1].start + 100)]
    windows = [ds.sources[2].window_of(k) for s, k in seen if s == 2]
    assert len(windows) == cap == len(set(windows))  # half an epoch: each window at most once


def test_s3_source_reads_what_the_local_one_does(sources, moto_s3, tmp_path):
    bucket = moto_s3.new_bucket()
    remote = dict(sources)
    remote["code"] = f"s3://{bucket}/code"
    for f in sorted(Path(sources["code"]).iterdir()):
        moto_s3.put(f"{remote['code']}/{f.name}", f.read_bytes())
    args = ["--data.seq_len=32", f"--data.cache_dir={tmp_path / 'cache'}"]
    local = open_train_data(load_config(mixture_toml(tmp_path / "l.toml", sources), args))
    mixed = open_train_data(load_config(mixture_toml(tmp_path / "r.toml", remote), args))
    assert mixed.sources[1].cache is not None
    mixed.prefetch(0, 64, micro_batch=4, dp_size=2, dp_rank=1)
    assert np.array_equal(mixed.batch(0, 64).numpy(), local.batch(0, 64).numpy())
    mixed.close()


@pytest.mark.slow
def test_cli_trains_from_an_s3_source_as_from_the_local_one(sources, moto_s3, tmp_path):
    bucket = moto_s3.new_bucket()
    remote = {"prose": sources["prose"], "code": f"s3://{bucket}/code"}
    for f in sorted(Path(sources["code"]).iterdir()):
        moto_s3.put(f"{remote['code']}/{f.name}", f.read_bytes())
    local = {"prose": sources["prose"], "code": sources["code"]}
    got = {}
    for label, srcs in (("local", local), ("s3", remote)):
        run = tmp_path / label
        toml = mixture_toml(tmp_path / f"{label}.toml", srcs, (1, 1))
        extra = [f"--train.run_dir={run}", "--train.steps=3", f"--data.cache_dir={tmp_path}/c"]
        helpers.triaxis("train", toml, *COMMON, *extra)
        got[label] = helpers.losses(run)
        last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
        assert last["tokens/prose"] + last["tokens/code"] == 3 * 8 * 32
    assert got["s3"] == got["local"] and len(got["s3"]) == 3


def test_sources_with_another_tokenizer_are_refused(sources, tmp_path):
    other = tmp_path / "other"
    import shutil

    shutil.copytree(sources["code"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["eos_id"] = 10
    (other / "manifest.json").write_text(json.dumps(manifest))
    srcs = {"prose": sources["prose"], "other": str(other)}
    cfg = load_config(mixture_toml(tmp_path / "m.toml", srcs, (1, 1)), ["--data.seq_len=32"])
    with pytest.raises(UserError, match=r"data.sources\[1\] .* has another tokenizer"):
        open_train_data(cfg)


# -- training: exact resume, a data-parallel change, the CLI -------------------------------

COMMON = [
    "--model.preset=tiny",
    "--data.seq_len=32",
    "--train.global_batch=8",
    "--train.lr=3e-3",
    "--train.warmup_steps=2",
    "--train.val_every=0",
    "--train.device=cpu",
    "--checkpoint.save_final=false",
    "--metrics.log_every=1",
    "--metrics.tensorboard=false",
    "--metrics.progress=false",
]


def mix_collect(rank: int, world: int, toml: str, run_dir: str, extra: list[str]) -> dict:
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = load_config(toml, [*COMMON, f"--train.run_dir={run_dir}", *extra])
    return {"losses": Trainer(cfg, init_distributed("cpu")).fit().losses}


@pytest.mark.slow
def test_resume_exact_and_across_a_data_parallel_change(sources, tmp_path):
    """One uninterrupted process; then steps 1-3 in one process, 4-6 under dp_shard=2 (world 2),
    7-8 in one process again, each resumed from the last one's checkpoint: the same losses."""
    # "numbers" capped at 6 samples: it runs out during step 4 of 8 (a phase change inside)
    windows = TokenDataset(sources["numbers"], "train", 32).num_windows
    toml = mixture_toml(tmp_path / "m.toml", sources, numbers={"epochs": 6.5 / windows})
    ds = open_train_data(load_config(toml, ["--data.seq_len=32"]))
    assert ds.caps[2] == 6 and 24 < ds.phases[1].start < 40
    ref = mix_collect(0, 1, toml, str(tmp_path / "ref"), ["--train.steps=8"])["losses"]
    steps = ["--train.steps=8", "--train.exit_after_steps=3", "--checkpoint.interval=3"]
    run = str(tmp_path / "run")
    got = dict(mix_collect(0, 1, toml, run, [*steps, "--train.micro_batch=4"])["losses"])
    out = run_workers(
        mix_collect,
        2,
        toml,
        run,
        [*steps, "--parallel.dp_shard=2", "--train.micro_batch=2"],
        timeout_s=240,
    )
    got.update(out[0]["losses"])
    got.update(mix_collect(0, 1, toml, run, [*steps, "--train.micro_batch=8"])["losses"])
    assert sorted(got) == list(range(1, 9))
    for step, want in ref.items():
        assert abs(got[step] - want) <= 1e-5 * abs(want), (step, got[step], want)


@pytest.mark.slow
def test_cli_trains_three_sources_and_logs_each(sources, tmp_path):
    run = tmp_path / "run"
    toml = mixture_toml(tmp_path / "m.toml", sources)
    args = [*COMMON, f"--train.run_dir={run}", "--train.steps=6", "--train.val_every=3"]
    helpers.triaxis(
        "train",
        toml,
        *args,
        "--metrics.tensorboard=true",
        "--train.val_batches=1",
        "--checkpoint.save_final=true",
    )
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    for step, rec in steps.items():
        tokens = [rec[f"tokens/{n}"] for n in NAMES]
        assert sum(tokens) == step * 8 * 32
        for t, w in zip(tokens, (0.5, 0.3, 0.2)):  # within the bound (< 2 samples) of weights
            assert abs(t / 32 - step * 8 * w) < 2
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6]
    for r in vals:
        per = [r[f"val_loss/{n}"] for n in NAMES]
        assert abs(r["val_loss"] - (0.5 * per[0] + 0.3 * per[1] + 0.2 * per[2])) < 1e-6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"]
    assert {f"{k}/{n}" for k in ("tokens", "val_loss") for n in NAMES} <= set(tags)
    # generate finds the (shared) tokenizer through the first source
    out = helpers.triaxis(
        "generate", "--checkpoint", run, "--prompt", "def ", "--max-new-tokens", 8
    )
    assert out.stdout.startswith("def ")
    # the resolved config reloads as the same mixture (and without data.path)
    resolved = load_config(str(run / "config.toml"))
    assert [s.path for s in resolved.data.sources] == list(sources.values())
    assert "\npath = " not in (run / "config.toml").read_text().split("[[data.sources]]")[0]


@pytest.mark.slow
def test_prepare_of_each_source_is_byte_identical_for_any_worker_count(tmp_path):
    from triaxis.data.encode import CHUNK_DOCS
    from triaxis.data.prepare import PrepareOptions, prepare

    assert 400 > CHUNK_DOCS  # several chunks of work: the pool really splits each source
    for name in ("prose", "code"):
        write_text(tmp_path / "raw" / name, name, n=400)
        got = {}
        for workers in (1, 3):
            out = tmp_path / f"{name}-{workers}"
            prepare(
                PrepareOptions(
                    inputs=[str(tmp_path / "raw" / name)],
                    output=str(out),
                    tokenizer="byte",
                    shard_tokens=20_000,
                    workers=workers,
                ),
                log=lambda *_: None,
            )
            got[workers] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
        assert got[1] == got[3] and len(got[1]) > 3
