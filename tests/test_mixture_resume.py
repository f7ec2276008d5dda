"""A mixture across a resume: new weights start a new phase at the resume cursor (samples before
it keep the old assignment, every source continues its own order without a repeat or a skip,
per-source counters continue); other sources or epochs caps are refused in one line; extreme
finite weights neither overflow nor lose a source."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from tests.test_mixture import _Stub
from triaxis.data.mixture import MixtureDataset
from triaxis.errors import UserError

NAMES = list("abcdefgh")


def mixture(weights, caps=None) -> MixtureDataset:
    k = len(weights)
    return MixtureDataset([_Stub()] * k, weights, NAMES[:k], caps or [None] * k)


def resumed(schedule, caps=None) -> MixtureDataset:
    """The mixture after resumes at each (cursor, weights) of `schedule` (the first at 0)."""
    ds = mixture(schedule[0][1], caps)
    for cursor, weights in schedule[1:]:
        state = ds.state()
        ds = mixture(weights, caps)
        ds.restore(state, cursor)
    return ds


SCHEDULES = {
    "anneal": [(0, [5, 3, 2]), (37, [1, 1, 8])],
    "three_phases": [(0, [1, 1]), (10, [9, 1]), (11, [1, 9])],
    "back_and_forth": [(0, [2, 1, 1, 3]), (64, [1, 1, 1, 1]), (65, [2, 1, 1, 3])],
    "same_cursor_twice": [(0, [1, 2]), (20, [3, 1]), (20, [1, 5])],
    "drop_to_tiny": [(0, [1, 1, 1]), (30, [1e-9, 1, 1e9])],
}


@pytest.mark.parametrize("caps", [None, "capped"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_new_weights_start_a_phase_at_the_cursor(name, caps):
    schedule = SCHEDULES[name]
    k = len(schedule[0][1])
    caps = [None] * k if caps is None else [40] + [None] * (k - 1)
    n = 200
    # The reference: each span [c_e, c_(e+1)) is what a run with the history up to e reads.
    ds = resumed(schedule, caps)
    for e in range(len(schedule)):
        part = resumed(schedule[: e + 1], caps)
        stop = schedule[e + 1][0] if e + 1 < len(schedule) else n
        for i in range(schedule[e][0], stop):
            assert ds.locate(i) == part.locate(i), (name, e, i)
    seen = [ds.locate(i) for i in range(n)]
    # Every source reads its own order 0, 1, 2, ... : nothing repeated, nothing skipped.
    for s in range(k):
        assert [j for t, j in seen if t == s] == list(range(sum(t == s for t, _ in seen)))
    # Counters continue: monotone, and they add up.
    prev = [0] * k
    for stop in range(n + 1):
        now = ds.counts(stop)
        assert sum(now) == stop and all(a >= b for a, b in zip(now, prev))
        prev = now
    if caps[0]:
        assert ds.counts(n)[0] <= 40
    # After the last change, the last weights' shares.
    last_c, last_w = schedule[-1]
    if not caps[0]:
        got = [a - b for a, b in zip(ds.counts(n), ds.counts(last_c))]
        share = [(n - last_c) * w / sum(last_w) for w in last_w]
        assert all(abs(g - x) < 2 for g, x in zip(got, share)), (got, share)


def test_same_weights_resume_as_saved_and_the_cursor_is_a_pure_function():
    schedule = SCHEDULES["three_phases"]
    a, b = resumed(schedule), resumed(schedule)
    assert [a.locate(i) for i in range(300)] == [b.locate(i) for i in range(300)]
    again = mixture(schedule[-1][1])
    assert again.restore(a.state(), 150) is None  # unchanged weights: no new phase
    assert again.history == a.history
    assert [again.locate(i) for i in range(300)] == [a.locate(i) for i in range(300)]


@pytest.mark.parametrize(
    "weights, caps, words",
    [
        ([1, 1, 1, 1], None, "sources"),  # a source added
        ([1, 1], None, "sources"),  # a source removed
        ([1, 1, 1], [5, None, None], "epochs"),  # an epochs cap added
    ],
)
def test_other_sources_or_caps_are_refused(weights, caps, words):
    state = mixture([1, 2, 3]).state()
    with pytest.raises(UserError) as e:
        mixture(weights, caps).restore(state, 12)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_renamed_sources_and_a_missing_history_are_refused():
    state = mixture([1, 2, 3]).state()
    ds = MixtureDataset([_Stub()] * 3, [1, 2, 3], ["a", "c", "b"], [None] * 3)
    with pytest.raises(UserError, match="changed since the checkpoint"):
        ds.restore(state, 5)
    with pytest.raises(UserError, match="holds no data.sources history"):
        mixture([1, 2, 3]).restore({}, 5)
    assert mixture([1, 2, 3]).restore({}, 0) is None


EXTREMES = {
    "huge_tiny": [1e300, 1e-300],
    "near_max": [1.7e308, 1.7e308, 1.7e308],
    "subnormal": [5e-324, 5e-324, 1e-300],
    "ratio": [1e308, 1.0, 5e-324],
    "many": [10.0 ** random.Random(7).randint(-300, 300) for _ in range(64)],
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_finite_weights(name):
    weights = EXTREMES[name]
    ds = mixture(weights) if len(weights) <= 8 else _many(weights)
    assert all(math.isfinite(w) and w >= 0 for w in ds.weights)
    assert math.isclose(sum(ds.weights), 1.0, rel_tol=1e-9)
    assert all(math.isfinite(b) for b in ds.window_bound)
    exact = [Fraction(w) for w in weights]
    for n in (1, 1000, 10**30, 10**400, 10**700):
        got = ds.counts(n)
        assert sum(got) == n
        for s, (g, b) in enumerate(zip(got, ds.window_bound)):
            # Exact: the window bound holds even where floats would see 0 or inf.
            assert abs(g - n * exact[s] / sum(exact)) < b + 1e-9, (name, s, n)
    # No source is lost: each appears as soon as its share makes a sample due.
    for s in range(len(weights)):
        need = math.ceil(sum(exact) / exact[s]) * 4
        assert ds.counts(need)[s] >= 1, (name, s)


def _many(weights) -> MixtureDataset:
    k = len(weights)
    return MixtureDataset([_Stub()] * k, weights, [f"s{i}" for i in range(k)], [None] * k)


# -- through the trainer: the checkpoint carries the history ---------------------------------


def test_trainer_resume_with_new_weights_continues_each_source(tmp_path):
    """Steps 1-3 at weights (5, 3, 2), resumed for 4-6 at (1, 1, 8): steps 1-3 of the resumed
    history are the first run's, per-source token counters never go back, and steps 4-6 follow
    the new weights; a resume with a source removed is refused in one line."""
    import json

    from tests.test_mixture import mix_collect, mixture_toml, sources
    from triaxis.config import load_config
    from triaxis.data.mixture import open_train_data

    srcs = sources.__wrapped__(_Factory(tmp_path))
    run = tmp_path / "run"
    steps = ["--train.steps=6", "--checkpoint.interval=3", "--train.micro_batch=8"]
    first = mixture_toml(tmp_path / "a.toml", srcs, (5, 3, 2))
    mix_collect(0, 1, first, str(run), [*steps, "--train.exit_after_steps=3"])
    second = mixture_toml(tmp_path / "b.toml", srcs, (1, 1, 8))
    mix_collect(0, 1, second, str(run), steps)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: [r[f"tokens/{n}"] for n in srcs] for r in records if "loss" in r}
    assert sorted(tokens) == list(range(1, 7))
    for step in range(2, 7):
        assert all(a >= b for a, b in zip(tokens[step], tokens[step - 1])), tokens
    ds_a = open_train_data(load_config(first, ["--data.seq_len=32"]))
    ds_b = open_train_data(load_config(second, ["--data.seq_len=32"]))
    ds_b.restore(ds_a.state(), 24)
    assert [ds_b.locate(i) for i in range(24)] == [ds_a.locate(i) for i in range(24)]
    assert tokens[6] == [n * 32 for n in ds_b.counts(48)]
    new = [a - b for a, b in zip(ds_b.counts(48), ds_b.counts(24))]
    assert all(abs(n - 24 * w) < 2 for n, w in zip(new, (0.1, 0.1, 0.8))), new

    fewer = mixture_toml(tmp_path / "c.toml", dict(list(srcs.items())[:2]), (1, 1))
    with pytest.raises(UserError, match="changed since the checkpoint"):
        mix_collect(0, 1, fewer, str(run), ["--train.steps=9", "--train.micro_batch=8"])


class _Factory:
    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        path = self.root / name
        path.mkdir()
        return path
