"""Where `prepare` writes: a staging folder, swapped in only when the whole preparation worked.

Bad input never destroys data. Before any work the output is checked: a previous preparation's
manifest is read (a corrupt one is refused: which files are its own is then unknown), and any
file named like an output of ours (train_NNNNN.bin / .mask, val_NNNNN.bin, tokenizer.json) that no
manifest lists is refused, not overwritten. Everything is then written into a hidden staging
folder (prefix) inside the output; a failure anywhere -- bad input found late, a full disk --
removes the staging folder and leaves the output exactly as it was. On success the old
manifest is removed first (no reader sees mixed shards), the new files are moved in (a rename
locally; a server-side copy on S3), the new manifest is written last (it commits), and only
then are the files the old manifest listed, and the new one does not, deleted. Files the old
manifest did not list are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid

from triaxis import storage
from triaxis.data.format import MANIFEST
from triaxis.errors import UserError

STAGE_PREFIX = ".triaxis-prepare-"
OUR_NAMES = re.compile(r"^((train|val)_\d{5}\.(bin|mask)|tokenizer\.json)$")


class StagedOutput:
    """One preparation's output: checked when made, written by `put`, then `commit` or
    `abort` (module docstring)."""

    def __init__(self, out: str, log=print):
        self.out, self.log = out, log
        self.remote = storage.is_remote(out)
        if not self.remote and os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"--output {out} is a file; pass a folder (or an s3:// prefix)")
        self.names = set(storage.listdir(out))
        self.owned = self._owned_by_old_manifest()
        foreign = sorted(n for n in self.names if OUR_NAMES.match(n) and n not in self.owned)
        if foreign:
            raise UserError(
                f"--output {out} holds {foreign[0]} ({len(foreign)} such file(s)) "
                "that no triaxis manifest there lists: prepare will not overwrite "
                "files it did not write; move them or choose another --output"
            )
        # The outermost folder this run will create (None: the output exists): removed again
        # if the preparation fails.
        self.created = None if self.remote or os.path.isdir(out) else _first_missing(out)
        self.stage = storage.join(out, f"{STAGE_PREFIX}{uuid.uuid4().hex[:12]}")
        self.written: list[str] = []

    def _owned_by_old_manifest(self) -> set[str]:
        if MANIFEST not in self.names:
            return set()
        path = storage.join(self.out, MANIFEST)
        try:
            raw = storage.read_bytes(path)
            manifest = json.loads(raw)
            owned = {MANIFEST}
            tok = manifest.get("tokenizer", {})
            if isinstance(tok, dict) and tok.get("file"):
                owned.add(str(tok["file"]))
            for split in manifest["splits"].values():
                owned.update(str(s["file"]) for s in split["shards"])
                owned.update(str(s["mask_file"]) for s in split["shards"] if "mask_file" in s)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{path} is not a readable triaxis manifest, so which files in "
                f"{self.out} are a previous preparation's is unknown; remove or fix "
                "it, or choose another --output"
            ) from None
        return owned

    def put(self, path: str, data: bytes) -> None:
        """Write one staged file (`path` is under self.stage)."""
        try:
            storage.write_bytes(path, data)
        except OSError as e:
            if self.remote or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"--output {self.out}: the disk is full (writing "
                f"{os.path.basename(path)}); free space or choose another "
                "--output; nothing was changed"
            ) from None
        self.written.append(path.rsplit("/", 1)[-1] if self.remote else os.path.basename(path))

    def commit(self, manifest: bytes) -> None:
        """Swap the staged files in; the manifest last; then remove the old ones."""
        new = set(self.written) | {MANIFEST}
        old_manifest = storage.join(self.out, MANIFEST)
        if MANIFEST in self.names:
            self.log(f"replacing the prepared data in {self.out}")
            storage.remove_all([old_manifest])  # uncommit first: no reader sees mixed shards
        for name in self.written:
            src, dst = storage.join(self.stage, name), storage.join(self.out, name)
            if self.remote:
                storage.copy(src, dst)
            else:
                os.replace(src, dst)
        storage.write_bytes(old_manifest, manifest)
        stale = sorted(self.owned - new)
        storage.remove_all([storage.join(self.out, n) for n in stale])
        self.abort(keep_output=True)

    def abort(self, keep_output: bool = False) -> None:
        """Remove the staging folder (and the output folder if this run created it)."""
        if self.remote:
            staged = [storage.join(self.stage, n) for n in storage.listdir(self.stage)]
            storage.remove_all(staged)
            return
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.created and not keep_output:
            shutil.rmtree(self.created, ignore_errors=True)  # did not exist: all of it is ours


def _first_missing(path: str) -> str:
    """The outermost ancestor of `path` (or `path` itself) that does not exist yet."""
    p = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(p)):
        p = os.path.dirname(p)
    return p
