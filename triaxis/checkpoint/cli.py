"""`triaxis ckpt list|verify DIR|URI`."""

from __future__ import annotations

import argparse
import json

from triaxis.checkpoint import manifest as mf
from triaxis.errors import UserError


def _list(a: argparse.Namespace) -> int:
    found = mf.list_checkpoints(a.location)
    partial = mf.uncommitted(a.location)
    if not found and not partial:
        raise UserError(
            f"no checkpoints under {a.location}; pass a checkpoint folder or "
            "s3:// prefix (RUN_DIR/checkpoints by default)"
        )
    print(f"{'step':>8}  {'cursor':>10}  {'files':>5}  {'MiB':>9}  layout")
    for f in found:
        try:
            meta = mf.load_manifest(f.path)  # names checked; no data file is opened
        except mf.InvalidManifest as err:
            print(f"{f.step:>8}  invalid manifest ({err}): {f.path}")
            continue
        mib = sum(x["size"] for x in meta["files"].values()) / 2**20
        layout = " ".join(f"{k}={v}" for k, v in meta["layout"].items() if k != "world_size")
        print(
            f"{f.step:>8}  {meta['cursor']:>10}  {len(meta['files']):>5}  {mib:>9.2f}  "
            f"world {meta['layout'].get('world_size', '?')}: {layout}"
        )
    for p in partial:
        print(f"{'-':>8}  incomplete (no manifest, ignored): {p}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    found = mf.list_checkpoints(a.location)
    if a.step is not None:
        found = [f for f in found if f.step == a.step]
    if not found:
        raise UserError(
            f"no complete checkpoint{'' if a.step is None else f' at step {a.step}'}"
            f" under {a.location}"
        )
    bad = 0
    for f in found:
        problems = mf.verify(f.path)
        print(
            json.dumps({"step": f.step, "path": f.path, "ok": not problems, "problems": problems})
        )
        bad += bool(problems)
    return 1 if bad else 0


def add_ckpt_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list or verify checkpoints (local or s3://)")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="committed checkpoints, with step, cursor and layout")
    ls.add_argument("location")
    ls.set_defaults(fn=_list)
    ve = verbs.add_parser("verify", help="recompute every checksum; check names and metadata")
    ve.add_argument("location")
    ve.add_argument("--step", type=int, default=None)
    ve.set_defaults(fn=_verify)
