"""Self-contained checkpoints (issue 25, item 2): every checkpoint carries its tokenizer, special
tokens, chat template and generation config, so `generate`, `export-hf` and
`checkpoint.initial` work with the data folder deleted, from any directory, locally or on S3;
the carried files are covered by the checkpoint's checksums like DCP's own."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import train_args
from tests.test_tokenizer_hf import BOS, EOS, WORDS, llama_like_tokenizer, write_docs, write_folder
from triaxis.checkpoint import manifest as mf
from triaxis.cli import main
from triaxis.data.prepare import PrepareOptions, prepare

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"


@pytest.fixture
def hf_data(tmp_path):
    """(a prepared folder tokenized with a Hugging Face tokenizer, that tokenizer's folder)."""
    hf = write_folder(
        tmp_path / "model",
        llama_like_tokenizer(),
        {"eos_token": EOS, "bos_token": BOS, "chat_template": TEMPLATE},
    )
    write_docs(tmp_path / "docs", 120)
    out = tmp_path / "data"
    prepare(
        PrepareOptions(
            inputs=[str(tmp_path / "docs")],
            output=str(out),
            tokenizer=f"hf:{hf}",
            val_fraction=0.1,
        )
    )
    return out, hf


def _train(data, run_dir, *extra) -> None:
    args = train_args(data, run_dir, "--train.steps=1", "--model.max_seq_len=64", *extra)
    assert main(["train", *args]) == 0


def test_checkpoint_serves_generate_export_and_initial_without_its_data(
    hf_data, tmp_path, monkeypatch, capsys
):
    import transformers

    data, hf = hf_data
    spare = tmp_path / "spare"
    shutil.copytree(data, spare)
    _train(data, tmp_path / "run")
    ckpt = mf.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1].path
    meta = mf.read_meta(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert name in meta["files"], sorted(meta["files"])
    assert mf.verify(ckpt) == []
    shutil.rmtree(data)
    shutil.rmtree(hf)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()

    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", WORDS[0]]
    assert main([*argv, "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(WORDS[0])

    out = tmp_path / "hf_out"
    assert main(["export-hf", str(tmp_path / "run"), str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    original = llama_like_tokenizer()
    text = " ".join(WORDS[:9])
    assert tok(text)["input_ids"] == original.encode(text).ids
    assert tok.eos_token == EOS and tok.chat_template == TEMPLATE
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == original.token_to_id(EOS)
    assert gen.bos_token_id == original.token_to_id(BOS)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == original.token_to_id(EOS)

    # Fine-tuning from it: the initial checkpoint's data is gone, the new run has its own.
    _train(spare, tmp_path / "run2", f"--checkpoint.initial={ckpt}")


def test_a_changed_carried_file_is_caught(hf_data, tmp_path, monkeypatch, capsys):
    data, _ = hf_data
    _train(data, tmp_path / "run")
    ckpt = mf.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1].path
    path = f"{ckpt}/tokenizer.json"
    raw = bytearray(open(path, "rb").read())
    raw[10] ^= 1
    open(path, "wb").write(bytes(raw))
    assert any("tokenizer.json" in p for p in mf.verify(ckpt))
    capsys.readouterr()
    argv = ["generate", "--checkpoint", ckpt, "--prompt", "x", "--max-new-tokens", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.json fails its checksum" in err[0], err


@pytest.mark.slow
def test_s3_checkpoint_carries_its_tokenizer(moto_s3, hf_data, tmp_path, monkeypatch, capsys):
    data, hf = hf_data
    uri = f"s3://{moto_s3.new_bucket()}/runs/one"
    _train(data, tmp_path / "run", f"--checkpoint.dir={uri}")
    ckpt = mf.list_checkpoints(uri)[-1].path
    assert "tokenizer_config.json" in mf.read_meta(ckpt)["files"]
    assert mf.verify(ckpt) == []
    shutil.rmtree(data)
    shutil.rmtree(hf)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", uri, "--prompt", WORDS[1], "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(WORDS[1])


def test_an_older_checkpoint_exports_its_weights_with_a_hint(tmp_path, capsys):
    """A checkpoint without carried files (written before, or by import-hf) whose data folder is
    gone: export-hf writes the weights and says in one line what it could not include."""
    from tests.bad_input_workspace import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "ckpt")
    meta = json.loads((ckpt / mf.META).read_text())
    meta["data_path"] = str(tmp_path / "gone")
    (ckpt / mf.META).write_text(json.dumps(meta))
    assert main(["export-hf", str(ckpt), str(tmp_path / "out")]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "which is gone" in notes[0], notes
    assert "before checkpoints carried their tokenizer" in notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
