"""Input documents for `triaxis prepare`: local or s3:// files, folders and globs, streamed.

Formats, by extension:
    .txt .md .rst .py (and any file named directly)   one document per file
    .jsonl .json                                      one document per line: {"text": ...}
                                                      (a .json file holding one array of such
                                                      objects works too)
    .parquet                                          one document per row of the `text` column

Files are read one at a time, in a fixed order (each input's files sorted by path). JSON Lines
and Parquet are streamed (ranged reads through `triaxis.storage` for s3://), so memory holds one
plain-text file or one Parquet row group, not the corpus.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from triaxis import storage, storage_client
from triaxis.errors import UserError

TEXT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS
_READ_CHUNK_BYTES = 8 * 2**20
"""Size of one ranged read of a remote JSON Lines or Parquet file."""


def embedded_corpus_files() -> list[str]:
    """The running interpreter's standard-library sources: a corpus that needs no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Tests, and the codec / help-text tables (encodings, pydoc_data): data, not code.
    skip = {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
    files = [p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts)]
    return [str(p) for p in sorted(files)]


def resolve_inputs(inputs: list[str], extensions: tuple[str, ...]) -> list[str]:
    """Every input file, in order: each spec (file, folder or glob) expanded and sorted."""
    files: list[str] = []
    for spec in inputs:
        files.extend(
            _resolve_remote(spec, extensions)
            if storage.is_remote(spec)
            else _resolve_local(spec, extensions)
        )
    return files


def _resolve_local(spec: str, extensions: tuple[str, ...]) -> list[str]:
    p = Path(spec)
    if p.is_file():
        return [spec]
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in extensions)
        if not found:
            raise UserError(
                f"input folder {spec} holds no {'/'.join(extensions)} files; "
                "point --input at text files or a glob like 'docs/**/*.txt'"
            )
        return [str(f) for f in found]
    found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not found:
        raise UserError(
            f"input {spec!r} matches no file or folder; check the path "
            "(globs need quotes: --input 'data/*.txt')"
        )
    return [str(f) for f in found]


def _resolve_remote(spec: str, extensions: tuple[str, ...]) -> list[str]:
    storage_client.check_location(spec, "--input")
    found = storage.list_files(spec, extensions)
    if not found:
        raise UserError(
            f"input {spec} matches no object with a {'/'.join(extensions)} "
            "extension; check the bucket and prefix (aws s3 ls)"
        )
    return found


def file_documents(path: str) -> Iterator[str]:
    """The documents of one input file, in file order (empty ones included)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
        yield from _json_documents(path)
    elif ext in PARQUET_EXTENSIONS:
        yield from _parquet_documents(path)
    else:
        data = storage.read_bytes(path)
        if b"\x00" in data:
            # No text holds NUL bytes: a binary file (or UTF-16), which would train on garbage.
            raise UserError(
                f"{path} holds NUL bytes: it is not UTF-8 text (a binary file, or "
                "UTF-16?); pass text files, or convert it to UTF-8"
            )
        yield data.decode("utf-8", errors="replace")


def _json_text(obj, where: str) -> str:
    if not isinstance(obj, dict) or "text" not in obj:
        raise UserError(
            f"{where} has no 'text' field; JSON Lines input needs one object per "
            'line like {"text": "..."}'
        )
    text = obj["text"]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: 'text' is a {type(text).__name__}, not a string")
    # JSON may escape lone surrogates, which no tokenizer accepts: replace them.
    return text.encode("utf-8", errors="replace").decode("utf-8")


_EXAMPLES = {
    "text": '{"text": "..."}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, ...]}',
    "prompt-completion": '{"prompt": "...", "completion": "..."}',
}


def json_records(path: str, fmt: str = "text") -> Iterator[tuple[object, str]]:
    """(object, where) for each item of a JSON array file or each non-blank JSON line."""
    example = _EXAMPLES.get(fmt, _EXAMPLES["text"])
    with storage.open_read(path, _READ_CHUNK_BYTES) as f:
        head = f.peek(64)[:64].lstrip()
        if head.startswith(b"["):  # one JSON array of objects
            try:
                rows = json.loads(f.read())
            except ValueError as e:
                raise UserError(
                    f"{path} is not valid JSON ({e}); give JSON Lines or an array"
                ) from None
            for i, obj in enumerate(rows):
                yield obj, f"{path} item {i}"
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(
                    f"{path} line {n} is not valid JSON ({e}); JSON Lines input "
                    f"needs one object per line like {example}"
                ) from None
            yield obj, f"{path} line {n}"


def _json_documents(path: str) -> Iterator[str]:
    for obj, where in json_records(path):
        yield _json_text(obj, where)


def _parquet_documents(path: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    import pyarrow

    # Parquet reads whole column chunks at known offsets: a read-ahead buffer would only over-read.
    with storage.open_read(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except pyarrow.ArrowException as e:
            raise UserError(
                f"{path} is not a readable Parquet file ({e}); check the file or its extension"
            ) from None
        if "text" not in pf.schema_arrow.names:
            raise UserError(
                f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                "rename the column holding the documents to text"
            )
        batches = pf.iter_batches(batch_size=1024, columns=["text"])  # a row group at a time
        while True:
            try:
                batch = next(batches, None)
            except pyarrow.ArrowException as e:
                raise UserError(f"{path} is damaged ({e}); check the file") from None
            if batch is None:
                return
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise UserError(
                        f"{path}: the 'text' column holds {type(text).__name__} values, not strings"
                    )
                yield text or ""


class InputCount:
    """What one pass over the input read, skipped and left unread, so that nothing is dropped
    without a word (prepare logs it)."""

    def __init__(self):
        self.docs = self.chars = self.blank = self.replaced = 0
        self.unread_docs = self.unread_chars = 0

    def report(self, limit: int) -> list[str]:
        """One line per way input did not become training text (empty when none did)."""
        lines = []
        if self.blank:
            lines.append(f"skipped {self.blank} empty or blank documents")
        if self.replaced:
            lines.append(
                f"{self.replaced} documents held invalid UTF-8 or lone surrogates, "
                "replaced by U+FFFD"
            )
        if self.unread_docs:
            lines.append(
                f"--max-bytes {limit} left {self.unread_docs} documents "
                f"({self.unread_chars:,} characters) unread; --max-bytes 0 reads all"
            )
        return lines


def iter_documents(
    files: list[str], max_bytes: int, count: InputCount | None = None
) -> Iterator[str]:
    """Non-blank documents of `files` in order, stopping after the document that brings the
    total past `max_bytes` characters (0 = no limit). With `count`, the rest is still read, to
    count what the limit left unread."""
    total = 0
    for path in files:
        for text in file_documents(path):
            if not text.strip():
                if count is not None and not (max_bytes and total >= max_bytes):
                    count.blank += 1
                continue
            if max_bytes and total >= max_bytes:
                if count is None:
                    return
                count.unread_docs += 1
                count.unread_chars += len(text)
                continue
            if count is not None:
                count.docs += 1
                count.chars += len(text)
                count.replaced += "\ufffd" in text
            yield text
            total += len(text)
