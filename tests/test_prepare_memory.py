"""BPE prepare of one long single-line document runs in bounded memory, and cutting long
documents into pieces never changes a token."""

import random
import subprocess
import sys

import numpy as np
import pytest

from triaxis.data.encode import split_long
from triaxis.data.tokenizer import BPETokenizer


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    seps = [" "] * 12 + ["  ", "\n", "\t", " \n ", "   "]
    words = ["alpha", "beta", "return", "def", "x_1", "ünï", "€uro", "(", ")", "+=", "42", "'s"]
    return "".join(
        rng.choice(words) + str(rng.randint(0, 99)) + rng.choice(seps) for _ in range(n_words)
    )


def test_pieces_join_to_the_text_and_give_the_same_tokens():
    text = _text(40_000)
    pieces = list(split_long(text, 5_000))
    assert "".join(pieces) == text and len(pieces) > 20
    assert max(len(p) for p in pieces) <= 5_000
    tok = BPETokenizer.train(iter([text]), 400)
    whole = tok.encode(text)
    assert [i for p in pieces for i in tok.encode(p)] == whole
    # No space to cut at: hard cuts, still complete.
    solid = "x" * 12_345
    assert "".join(split_long(solid, 1000)) == solid


@pytest.mark.slow
def test_long_single_line_document_memory_is_bounded(tmp_path):
    """6 MB on one line: before pieces, BPE prepare peaked near 1.6 GB (~260x the input; a
    41 MB line took 8.3 GB). Now the peak no longer grows with the document."""
    doc = tmp_path / "one_line.txt"
    doc.write_text(_text(1_000_000, seed=1).replace("\n", " "))
    size_mb = doc.stat().st_size / 2**20
    assert size_mb > 5
    # VmHWM is this process image's own peak. ru_maxrss is not: Linux carries the forked
    # parent's peak across exec, so inside a long pytest run it read 1.2 GB for a 0.3 GB job.
    code = (
        "import re, sys; from triaxis.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]);"
        " sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "prepare",
            "--input",
            str(doc),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "600",
            "--max-bytes",
            "0",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = int(proc.stdout.split("PEAK")[-1]) / 1024  # VmHWM is in kB
    print(f"input {size_mb:.1f} MB, peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 1000, f"{peak_mb:.0f} MB peak for a {size_mb:.1f} MB document"
    ids = np.fromfile(tmp_path / "out" / "train_00000.bin", dtype=np.uint16)
    assert ids.size > 1_000_000 and ids[-1] == 0  # eos (id 0 in a trained BPE) ends it
