"""The bad-input matrix's workspace (tests/test_bad_input.py): the files every case reads,
good and deliberately broken, and the snapshot that proves a case changed none of them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from tests.chat_data import bad_input_workspace

# Mixture configs: {name: [[data.sources]] tables}; "D" is the good data, "O" a copy of it
# whose tokenizer has another end-of-document id.
MIXES = {
    "mix_w0.toml": '[[data.sources]]\npath = "D"\n[[data.sources]]\npath = "D"\n'
    'name = "b"\nweight = 0',
    "mix_wneg.toml": '[[data.sources]]\npath = "D"\nweight = -2',
    "mix_empty.toml": "[data]\nsources = []",
    "mix_tok.toml": '[[data.sources]]\npath = "D"\n[[data.sources]]\npath = "O"',
    "mix_nopath.toml": "[[data.sources]]\nweight = 1",
    "mix_dup.toml": '[[data.sources]]\npath = "D"\n[[data.sources]]\npath = "D"',
    "mix_typo.toml": '[[data.sources]]\npath = "D"\nweigth = 2',
    "mix_ep0.toml": '[[data.sources]]\npath = "D"\nepochs = 0',
    "mix_short.toml": '[[data.sources]]\npath = "D"\nepochs = 1e-9',
    "mix_cap.toml": '[[data.sources]]\npath = "D"\nepochs = 1',
    "mix_ok.toml": '[[data.sources]]\npath = "D"\nweight = 2',
}

# Non-finite and out-of-range numbers as TOML writes them (a float where an int is due, an int
# beyond a float's range), in plain, optional and array-of-tables fields.
NUMBERS = {
    "int_inf.toml": "[train]\nsteps = inf",
    "int_nan.toml": "[train]\nsteps = nan",
    "int_neginf.toml": "[data]\nseq_len = -inf",
    "optint_inf.toml": "[model]\nvocab_size = inf",
    "float_inf.toml": "[train]\nlr = inf",
    "float_bigint.toml": "[train]\nlr = 1" + "0" * 400,
    "mix_inf.toml": '[[data.sources]]\npath = "D"\nepochs = -inf',
}


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def build(root: Path, byte_data: Path) -> Path:
    """The workspace every case runs against, under `root` (built once, never changed by a
    case): good and broken inputs, prepared data and its damaged copies, a checkpoint, HF
    folders."""
    from triaxis.hf.exporter import export_hf

    (root / "good.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    (root / "big.txt").write_text("print('hello world')\n" * 110_000)  # 2.4 M characters
    (root / "empty.txt").write_text("  \n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "truncated.json").write_text('[{"text": "a"}, {"text": ')
    (root / "notext.jsonl").write_text('{"body": "x"}\n')
    (root / "numtext.jsonl").write_text('{"text": 5}\n')
    (root / "binary.parquet").write_bytes(bytes(range(256)) * 4)
    (root / "binary.parquet.txt").write_bytes(bytes(range(256)) * 4)
    (root / "utf16.txt").write_text("def f():\n    pass\n" * 50, encoding="utf-16")
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00\x01garbage\x80")
    (root / "bad.toml").write_text("[train\nsteps = 3\n")
    (root / "notable.toml").write_text("steps = 3\n")
    (root / "wrongtype.toml").write_text('[train]\nsteps = "three"\n')
    (root / "empty.toml").write_text("")
    for name, text in NUMBERS.items():
        (root / name).write_text(text.replace('"D"', json.dumps(str(root / "data"))) + "\n")
    bad_input_workspace(root)  # chat / prompt-completion inputs (tests/chat_data.py)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "train_00000.bin").write_bytes(b"my own file, not triaxis's")
    (foreign / "notes.txt").write_text("keep me")

    data = root / "data"
    shutil.copytree(byte_data, data)

    def variant(name: str, change) -> None:
        shutil.copytree(data, root / name)
        change(root / name)

    shard = "train_00000.bin"
    variant("data_badjson", lambda d: (d / "manifest.json").write_text("{not json"))
    variant(
        "data_truncjson",
        lambda d: (d / "manifest.json").write_text((data / "manifest.json").read_text()[:200]),
    )
    variant("data_binjson", lambda d: (d / "manifest.json").write_bytes(b"\xff\x00\x9c"))
    variant(
        "data_badfields",
        lambda d: _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].pop("tokens")),
    )
    variant(
        "data_escape",
        lambda d: _edit_manifest(
            d, lambda m: m["splits"]["train"]["shards"][0].update(file="../data/" + shard)
        ),
    )
    variant("data_noshard", lambda d: (d / shard).unlink())
    variant("data_odd", lambda d: (d / shard).write_bytes((data / shard).read_bytes() + b"x"))
    variant("data_empty", lambda d: (d / shard).write_bytes(b""))
    variant(
        "data_half",
        lambda d: (d / shard).write_bytes(
            (data / shard).read_bytes()[: (d / shard).stat().st_size // 4 * 2]
        ),
    )

    def flip(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0x01  # still a valid byte token: only the checksum can tell
        path.write_bytes(bytes(raw))

    variant("data_flip", lambda d: flip(d / shard))
    variant("data_valflip", lambda d: flip(d / "val_00000.bin"))

    def big_token(d: Path) -> None:
        ids = np.fromfile(d / shard, dtype=np.uint16)
        ids[7] = 60000  # beyond the byte vocabulary (257); the manifest's sha256 matches
        (d / shard).write_bytes(ids.tobytes())
        _edit_manifest(
            d,
            lambda m: m["splits"]["train"]["shards"][0].update(
                sha256=hashlib.sha256(ids.tobytes()).hexdigest()
            ),
        )

    variant("data_bigtok", big_token)
    variant("data_othertok", lambda d: _edit_manifest(d, lambda m: m["tokenizer"].update(eos_id=9)))
    for name, text in MIXES.items():
        paths = {'"D"': f'"{data}"', '"O"': f'"{root / "data_othertok"}"'}
        for k, v in paths.items():
            text = text.replace(k, v)
        (root / name).write_text(text + "\n")
    variant("data_noeos", lambda d: _edit_manifest(d, lambda m: m["tokenizer"].pop("eos_id")))

    build_checkpoint(root / "ckpt")
    export_hf(str(root / "ckpt"), str(root / "hf"), log=lambda *_: None)
    shutil.copytree(root / "hf", root / "export")
    (root / "export" / "README.md").write_text("a user's own file next to the export")
    for name, change in (
        ("hf_badconfig", lambda d: (d / "config.json").write_text("{bad")),
        ("hf_strconfig", lambda d: _edit_json(d / "config.json", hidden_size="big")),
        ("hf_negconfig", lambda d: _edit_json(d / "config.json", num_hidden_layers=-1)),
        ("hf_nanconfig", lambda d: _edit_json(d / "config.json", rms_norm_eps=float("nan"))),
        ("hf_listconfig", lambda d: (d / "config.json").write_text("[1, 2]")),
        (
            "hf_badindex",
            lambda d: (d / "model.safetensors.index.json").write_text(
                '{"weight_map": {"x": "../../etc/passwd"}}'
            ),
        ),
        ("hf_binconfig", lambda d: (d / "config.json").write_bytes(b"\x00\xff\xfe")),
        (
            "hf_truncweights",
            lambda d: (d / "model.safetensors").write_bytes(
                (root / "hf" / "model.safetensors").read_bytes()[:300]
            ),
        ),
    ):
        shutil.copytree(root / "hf", root / name)
        change(root / name)
    return root


def build_checkpoint(folder: Path) -> Path:
    """A small committed checkpoint (byte vocabulary, random weights, no data folder recorded,
    as import-hf writes it) at `folder`."""
    import torch

    from triaxis.hf.importer import save_checkpoint
    from triaxis.model.llama import ModelArgs, Transformer

    args = ModelArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        vocab_size=257,
        max_seq_len=64,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(model, folder, source="test")
    return folder
