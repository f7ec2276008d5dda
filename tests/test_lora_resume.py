"""Resuming a LoRA run from a full run's checkpoint (and the reverse) is one line naming the
way that works, and leaves the checkpoint as it was (not set aside as bad)."""

import pytest

from tests.parity import make_config
from tests.test_lora import LORA
from triaxis.checkpoint import manifest as mf
from triaxis.errors import UserError

SAVE = {"checkpoint__save_final": "true", "train__steps": 2, "train__micro_batch": 4}


def _fit(data: str, run_dir: str, overrides: dict) -> None:
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    Trainer(make_config(data, run_dir, **overrides), init_distributed("cpu"), None).fit()


@pytest.mark.parametrize(
    "first, then, words",
    [
        ({}, LORA, "--checkpoint.initial="),
        (LORA, {}, "from a LoRA run and this run has lora.enabled=false"),
    ],
    ids=["full-then-lora", "lora-then-full"],
)
def test_resume_across_lora_is_one_line(first, then, words, byte_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _fit(byte_data, str(tmp_path / "a"), {**SAVE, **first, "checkpoint__dir": ckpt})
    before = [f.path for f in mf.list_checkpoints(ckpt)]
    over = {**SAVE, **then, "checkpoint__dir": ckpt, "train__steps": 4}
    with pytest.raises(UserError, match=words) as err:
        _fit(byte_data, str(tmp_path / "b"), over)
    assert "\n" not in str(err.value)
    assert [f.path for f in mf.list_checkpoints(ckpt)] == before
