"""`triaxis prepare --tokenizer hf:PATH`: a Hugging Face tokenizer.json, built here with the
`tokenizers` library (and once saved by transformers), tokenizes the documents exactly as it
would alone, each document followed by the configured end-of-document token."""

import json
from pathlib import Path

import numpy as np
import pytest

from triaxis.cli import main
from triaxis.data.encode import CHUNK_DOCS
from triaxis.data.prepare import PrepareOptions, prepare
from triaxis.data.tokenizer import HFTokenizer, load_tokenizer, tokenizer_from_state
from triaxis.errors import UserError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = ["def", "return", "naïve", "数据", "token", "shard", "✓", "\n", "  ", "fine-tune"]


def llama_like_tokenizer():
    """A tiny byte-level BPE with Llama-3's special tokens and BOS-adding post-processor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def write_folder(folder: Path, tok, config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_folder(
        tmp_path_factory.mktemp("hf"),
        llama_like_tokenizer(),
        {"eos_token": EOS, "bos_token": {"content": BOS, "special": True}},
    )


def write_docs(folder: Path, n: int) -> list[str]:
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 7 + 3)) for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def read_split(folder: Path, manifest: dict, split: str) -> np.ndarray:
    files = [folder / s["file"] for s in manifest["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=manifest["dtype"]) for f in files])


def run(inputs: Path, out: Path, tokenizer: str, **kw) -> dict:
    return prepare(
        PrepareOptions(
            inputs=[str(inputs)],
            output=str(out),
            tokenizer=tokenizer,
            val_fraction=0.25,
            workers=1,
            **kw,
        ),
        log=lambda *_: None,
    )


def test_shards_hold_each_document_encoded_then_eos(hf_dir, tmp_path):
    docs = write_docs(tmp_path / "in", 12)
    m = run(tmp_path / "in", tmp_path / "out", f"hf:{hf_dir}")
    tok = llama_like_tokenizer()
    eos = tok.token_to_id(EOS)
    for split, want in (
        ("train", [d for i, d in enumerate(docs) if i % 4 != 3]),
        ("val", [d for i, d in enumerate(docs) if i % 4 == 3]),
    ):
        expected = [i for d in want for i in tok.encode(d).ids + [eos]]
        assert read_split(tmp_path / "out", m, split).tolist() == expected, split
        assert expected[0] == tok.token_to_id(BOS)  # the post-processor ran
    assert m["dtype"] == "uint16"
    assert m["tokenizer"] == {
        "kind": "hf",
        "file": "tokenizer.json",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eos_id": eos,
        "eos_token": EOS,
        "source": str(hf_dir),
    }

    loaded = load_tokenizer(tmp_path / "out", m["tokenizer"])  # from the data folder alone
    assert isinstance(loaded, HFTokenizer) and loaded.eos_id == eos
    text = "def naïve ✓ 数据 return"
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode(text) == tok.encode(text).ids
    rebuilt = tokenizer_from_state(loaded.state())  # what a worker process does
    assert rebuilt.encode_batch([text]) == [tok.encode(text).ids]


def test_workers_give_identical_shards(hf_dir, tmp_path):
    write_docs(tmp_path / "in", CHUNK_DOCS + 50)  # two chunks: the pool really runs
    logs: list[str] = []
    manifests = [
        prepare(
            PrepareOptions(
                inputs=[str(tmp_path / "in")],
                tokenizer=f"hf:{hf_dir}",
                output=str(tmp_path / f"w{w}"),
                workers=w,
                shard_tokens=1_000,
            ),
            log=logs.append,
        )
        for w in (1, 2)
    ]
    assert "(2 worker processes)" in logs[-1]
    assert manifests[0] == manifests[1] and len(manifests[0]["splits"]["train"]["shards"]) > 1
    for name in [s["file"] for sp in manifests[0]["splits"].values() for s in sp["shards"]]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_tokenizer_json_path_eos_override_and_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    write_folder(tmp_path / "m", tok, config=None)  # no tokenizer_config.json: --eos-token
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("w1 w69999 w65536")
    m = run(
        tmp_path / "in",
        tmp_path / "out",
        f"hf:{tmp_path / 'm' / 'tokenizer.json'}",
        eos_token="</s>",
    )
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70_002
    tokens = read_split(tmp_path / "out", m, "train").tolist()
    assert tokens == [1, 69_999, 65_536, 70_001]


def test_vocab_size_covers_the_largest_id(tmp_path):
    from tokenizers import Tokenizer, models

    # Ids with a gap: 3 tokens, but id 7 needs an embedding row too.
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "</s>": 7}, unk_token="[UNK]"))
    write_folder(tmp_path / "m", tok, {"eos_token": "</s>"})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    m = run(tmp_path / "in", tmp_path / "out", f"hf:{tmp_path / 'm'}")
    assert m["tokenizer"]["vocab_size"] == 8


def test_transformers_saved_folder(tmp_path):
    transformers = pytest.importorskip("transformers")

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=llama_like_tokenizer(), bos_token=BOS, eos_token=EOS
    )
    fast.save_pretrained(str(tmp_path / "model"))
    docs = write_docs(tmp_path / "in", 4)
    m = run(tmp_path / "in", tmp_path / "out", f"hf:{tmp_path / 'model'}")
    assert m["tokenizer"]["eos_token"] == EOS
    assert m["tokenizer"]["eos_id"] == fast.convert_tokens_to_ids(EOS)
    train = [d for i, d in enumerate(docs) if i % 4 != 3]
    expected = [i for d in train for i in fast(d)["input_ids"] + [fast.eos_token_id]]
    assert read_split(tmp_path / "out", m, "train").tolist() == expected


def test_s3_tokenizer_folder(hf_dir, tmp_path, moto_s3):  # noqa: F811
    bucket = moto_s3.new_bucket()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        moto_s3.put(f"s3://{bucket}/Llama/{name}", (hf_dir / name).read_bytes())
    write_docs(tmp_path / "in", 8)
    local = run(tmp_path / "in", tmp_path / "a", f"hf:{hf_dir}")
    remote = run(tmp_path / "in", tmp_path / "b", f"hf:s3://{bucket}/Llama")
    assert remote["tokenizer"]["source"] == f"s3://{bucket}/Llama"
    assert remote["splits"] == local["splits"]
    with pytest.raises(UserError, match=r"s3://.*/Nope/tokenizer.json does not exist"):
        run(tmp_path / "in", tmp_path / "c", f"hf:s3://{bucket}/Nope")


def bad_folders(root: Path) -> None:
    tok = llama_like_tokenizer()
    (root / "empty").mkdir(parents=True)
    broken = root / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    write_folder(root / "no_eos", tok, {"bos_token": BOS})
    write_folder(root / "odd_eos", tok, {"eos_token": "</s>"})
    write_folder(root / "bad_config", tok, None)
    (root / "bad_config" / "tokenizer_config.json").write_text("{eos_token: oops")


@pytest.mark.parametrize(
    "tokenizer,eos,match",
    [
        ("hf:{root}/missing", "", r"missing does not exist; give a tokenizer.json or a Hugging"),
        ("hf:{root}/empty", "", r"empty/tokenizer.json does not exist; give a tokenizer.json"),
        ("hf:{root}/broken", "", r"broken/tokenizer.json is not a tokenizer.json the `tokenizers`"),
        ("hf:{root}/no_eos", "", r"no eos_token in a tokenizer_config.json .*--eos-token TEXT"),
        ("hf:{root}/odd_eos", "", r"'</s>' \(from .*tokenizer_config.json\) is not in the vocab"),
        ("hf:{root}/odd_eos", "", r"special tokens \['<\|begin_of_text\|>', '<\|end_of_text\|>'\]"),
        ("hf:{root}/no_eos", "<eos>", r"'<eos>' \(from --eos-token\) is not in the vocabulary"),
        ("hf:{root}/bad_config", "", r"tokenizer_config.json is not valid JSON"),
        ("hf:", "", r"no path after 'hf:'"),
        ("hf/{root}", "", r"is unknown; use bpe, byte or hf:PATH"),
        ("byte", "</s>", r"--eos-token '</s>' applies to --tokenizer hf:PATH only"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tokenizer, eos, match):
    bad_folders(tmp_path)
    write_docs(tmp_path / "in", 2)
    with pytest.raises(UserError, match=match) as err:
        run(tmp_path / "in", tmp_path / "out", tokenizer.format(root=tmp_path), eos_token=eos)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_refuses_vocab_size_with_hf(hf_dir, tmp_path, capsys):
    write_docs(tmp_path / "in", 2)
    args = [
        "prepare",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--tokenizer",
        f"hf:{hf_dir}",
    ]
    assert main([*args, "--vocab-size", "512"]) == 2
    assert "--vocab-size 512 applies to --tokenizer bpe only" in capsys.readouterr().err
    byte = [*args[:-1], "byte", "--vocab-size", "300"]
    assert main(byte) == 2
    assert (
        "--vocab-size 300 applies to --tokenizer bpe only; byte brings its own"
        in capsys.readouterr().err
    )
    assert main([*args, "--eos-token", EOS, "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["kind"] == "hf"
