"""Throughput counts real tokens: on packed data each window's trailing padding (end-of-document
tokens with a masked target) is counted on the device and left out of `tokens_per_s`, and the
record says what share of the positions it was (`padding_fraction`), the same in every layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.dist import run_workers
from tests.parity import train_collect
from tests.test_packing import PACK, chat  # noqa: F401  (a fixture)
from triaxis.config import DataConfig
from triaxis.data.dataset import TokenDataset, inputs_targets
from triaxis.model.loss import IGNORE_INDEX
from triaxis.train.padding import padding_positions


def test_padding_is_the_trailing_run_of_masked_end_tokens():
    eos, x = 9, IGNORE_INDEX
    inputs = torch.tensor([[5, 9, 6, 9, 9, 9], [5, 6, 7, 8, 1, 2], [9, 9, 9, 9, 9, 9]])
    targets = torch.tensor([[9, 6, 9, x, x, x], [6, 7, 8, 1, 2, 3], [x, x, x, x, x, x]])
    # Row 0: the last three positions (an inner end token with a real target is not padding);
    # row 1: none; row 2: all six.
    assert int(padding_positions(inputs, targets, eos)) == 3 + 0 + 6


def _expected_fraction(data: str, step: int) -> float:
    """Padding share of one step's global batch of 8 windows, counted here in numpy."""
    ds = TokenDataset(data, "train", PACK, DataConfig().seed)
    eos = ds.manifest["tokenizer"]["eos_id"]
    inputs, targets = inputs_targets(ds, (step - 1) * 8, 8, True)
    pad = 0
    for row_in, row_t in zip(np.asarray(inputs), np.asarray(targets)):
        for i, t in zip(row_in[::-1], row_t[::-1]):
            if i != eos or t != IGNORE_INDEX:
                break
            pad += 1
    return pad / (8 * PACK)


def _logged(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    return {r["step"]: r["padding_fraction"] for r in rows if "padding_fraction" in r}


@pytest.mark.slow
def test_padding_fraction_equals_the_count_in_every_layout(chat, tmp_path):  # noqa: F811
    data = str(chat["root"] / "packed")
    common = {"data__seq_len": PACK, "train__steps": 2, "data__document_mask": "true"}
    train_collect(0, 1, data, str(tmp_path / "one"), {**common, "train__micro_batch": 8})
    layout = {"parallel__dp_shard": 2, "train__micro_batch": 2}
    run_workers(train_collect, 2, data, str(tmp_path / "two"), {**common, **layout})
    want = {s: _expected_fraction(data, s) for s in (1, 2)}
    assert all(0 < f < 1 for f in want.values()), want
    assert _logged(tmp_path / "one") == want
    assert _logged(tmp_path / "two") == want
