"""checkpoint.hf: the run's own Hugging Face folder equals export-hf of the same checkpoint (and
triaxis's own logits), at world 1 and world 4 (dp_shard=2 x tp=2); a failed write leaves the
committed checkpoint as it was."""

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_workers
from tests.parity import make_config
from triaxis.checkpoint import manifest as mf
from triaxis.errors import UserError

transformers = pytest.importorskip("transformers")

HF = {
    "checkpoint__save_final": "true",
    "checkpoint__hf": "final",
    "checkpoint__hf_dtype": "fp32",
    "checkpoint__async_save": "false",
}


def train_with_hf(rank: int, world: int, data: str, run_dir: str, overrides: dict) -> int:
    """Worker: train with checkpoint.hf; this rank's weight bytes written into hf/."""
    from triaxis.hf.run_output import HfOutput
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(data, run_dir, **overrides)
    trainer = Trainer(cfg, init_distributed("cpu"), None)
    hook = trainer.ckpt.on_commit = HfOutput(cfg, rank, world, trainer.log)
    trainer.fit()
    return hook.last_bytes


def _latest(ckpt: str) -> str:
    return mf.list_checkpoints(ckpt)[-1].path


def _logits(folder, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits


def _check_against_export(step: str, tmp_path: Path) -> None:
    from triaxis.checkpoint.inference import load_for_inference
    from triaxis.hf.exporter import export_hf

    hf = Path(step) / "hf"
    names = sorted(p.name for p in hf.iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names, names
    assert not (Path(step) / ".hf.partial").exists()
    export_hf(step, str(tmp_path / "export"), log=lambda _m: None)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    got = _logits(hf, tokens)
    torch.testing.assert_close(got, _logits(tmp_path / "export", tokens), rtol=0, atol=0)
    model, _, _ = load_for_inference(step, "cpu", "")
    with torch.no_grad():
        want = model.eval()(tokens).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_run_writes_hf_folder_at_world_1(byte_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    written = train_with_hf(0, 1, byte_data, str(tmp_path / "run"), {**HF, "checkpoint__dir": ckpt})
    assert written > 0
    steps = mf.list_checkpoints(ckpt)
    _check_against_export(steps[-1].path, tmp_path)


@pytest.mark.slow  # four trainers
def test_run_writes_hf_folder_at_world_4_every_rank_a_share(byte_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    over = {**HF, "checkpoint__dir": ckpt, "parallel__dp_shard": 2, "parallel__tp": 2}
    over["train__micro_batch"] = 4
    written = run_workers(train_with_hf, 4, byte_data, str(tmp_path / "run"), over)
    assert all(b > 0 for b in written), written  # no rank wrote the whole model
    step = _latest(ckpt)
    index = json.loads((Path(step) / "hf" / "model.safetensors.index.json").read_text())
    assert sum(written) == index["metadata"]["total_size"]
    _check_against_export(step, tmp_path)


def test_failed_hf_write_keeps_the_checkpoint(byte_data, tmp_path, monkeypatch):
    from triaxis.hf import run_output

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_output, "write_safetensors", broken)
    ckpt = str(tmp_path / "ckpt")
    train_with_hf(0, 1, byte_data, str(tmp_path / "run"), {**HF, "checkpoint__dir": ckpt})
    step = _latest(ckpt)
    assert not (Path(step) / "hf").exists() and not (Path(step) / ".hf.partial").exists()
    from triaxis.checkpoint.inference import load_for_inference

    load_for_inference(step, "cpu", "")  # committed and whole


def test_every_writes_each_checkpoint(byte_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    over = {**HF, "checkpoint__dir": ckpt, "checkpoint__hf": "every", "checkpoint__interval": 2}
    train_with_hf(0, 1, byte_data, str(tmp_path / "run"), over)
    found = mf.list_checkpoints(ckpt)
    assert len(found) >= 2
    assert all((Path(f.path) / "hf" / "config.json").exists() for f in found)


@pytest.mark.parametrize(
    "over, expect",
    [
        ({"model__n_experts": 4, "model__moe_top_k": 2}, "dense Llama models only"),
    ],
)
def test_unsupported_hf_output_is_one_line(byte_data, tmp_path, over, expect):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(byte_data, str(tmp_path / "run"), **{**HF, **over})
    with pytest.raises(UserError, match=expect) as err:
        Trainer(cfg, init_distributed("cpu"), None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_run_without_the_writer_is_one_line(byte_data, tmp_path):
    from triaxis.train.run import run

    cfg = make_config(byte_data, str(tmp_path / "run"), **HF)
    with pytest.raises(UserError, match="needs the Hugging Face writer"):
        run(cfg)


@pytest.mark.slow  # a LoRA run of its own, two processes
def test_lora_run_writes_the_peft_adapter(byte_data, tmp_path):
    peft = pytest.importorskip("peft", reason="the test extra installs peft")
    from tests.test_lora import LORA
    from triaxis.hf.exporter import export_hf
    from triaxis.hf.lora_export import load_lora_model
    from triaxis.model.llama import model_rope_tables

    ckpt = str(tmp_path / "ckpt")
    over = {**HF, **LORA, "checkpoint__dir": ckpt, "train__micro_batch": 4}
    # world 2: rank 0 writes the adapter while rank 1 waits (its reads join no collective)
    run_workers(train_with_hf, 2, byte_data, str(tmp_path / "run"), over)
    step = _latest(ckpt)
    hf = Path(step) / "hf"
    names = {p.name for p in hf.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
    export_hf(step, str(tmp_path / "base"), log=lambda _m: None)  # the frozen base
    model, _, _ = load_lora_model(step)
    model.rope.copy_(model_rope_tables(model.args))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(tokens).float()
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, str(hf)).eval()(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
