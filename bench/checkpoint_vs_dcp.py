"""triaxis checkpoints side by side with plain torch.distributed.checkpoint, same state, same run.

    python bench/checkpoint_vs_dcp.py [--gb 1] [--repeats 3] [--s3-gb 0.1] [--no-async]

One process builds a model + AdamW state of about --gb GB (12 bytes per parameter), then, for
each operation, times triaxis's Checkpointer (checksums computed while writing; verification
on at load) and plain `dcp.save` / `dcp.async_save` / `dcp.load` of the same state dict into a
plain folder, alternating, --repeats times (median shown):

  save sync     until the checkpoint is committed (triaxis) / dcp.save returns; both sides
                take the state dict (get_state_dict) inside the timed part, as a trainer does
  save sync (cold)  the same after dropping both folders' files from the page cache
  save async    blocking = until training could go on; total = until committed / written
  staging copy  a plain copy of the state into fresh host tensors (what async must do at least)
  resume        triaxis Checkpointer.load (every item verified as it is read) / dcp.load,
                then set_state_dict (both put the state into the model and optimizer)
  load in place the same triaxis load / dcp.load alone into the live state dict (what a
                plain DCP user does: DCP copies into the model's and optimizer's tensors)
  ... (cold)    the same after dropping both folders' files from the page cache
                (posix_fadvise DONTNEED after sync: only this benchmark's files)

What each save does (this torch's defaults on the plain side):
  plain DCP  FileSystemWriter(sync_files=True, thread_count=1): one __0_0.distcp data file,
             fsync'd, then .metadata written as a .tmp, fsync'd, renamed.
  triaxis    the same FileSystemWriter, same defaults, same files and fsyncs, its stream
             hashing each item (XXH3-64) as it is written (integrity.py: no second pass);
             then a sidecar of those checksums and the manifest (the commit), each written
             to a temporary name and renamed over, not fsync'd (the data they vouch for is).
Before each save, the same for both sides: its own previous checkpoint removed, `sync`, 1 s
to settle (untimed); the first side alternates from one repeat to the next. Wall time and the
process's CPU time (all threads) are shown; under a loaded machine the CPU time is the steadier
of the two.

Peak extra host memory: the peak resident set above the start of each operation
(/proc/self/status VmHWM, reset through /proc/self/clear_refs), triaxis minus plain DCP.
`--s3-gb` repeats save and resume against moto's S3 server on loopback (started here, in this
process: its stored objects count in the resident set, so the memory column means nothing
there).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp import Checkpointer
from triaxis.config import CheckpointConfig
from triaxis.model.llama import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3_server (moto)


class _Log:
    def info(self, msg: str) -> None:
        pass

    warn = info


def _reset_peak() -> int:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn, before=None) -> tuple[float, float, int]:
    """(seconds, CPU seconds of every thread, peak resident bytes above the start); `before`
    runs first, untimed."""
    # Settle first: the previous op's garbage freed and its writes on disk, so that neither
    # side pays for what the other left behind (whoever went first was up to 1.5x slower).
    gc.collect()
    os.sync()
    time.sleep(0.5)
    if before is not None:
        before()
    base = _reset_peak()
    c0, t0 = _cpu_s(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu_s() - c0, max(0, _status("VmHWM") - base)


def drop_cache(folder: str) -> None:
    """Evict this folder's files from the page cache (clean pages only: sync first)."""
    os.sync()
    for dirpath, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def build(gb: float, folder: str, target: str):
    params = gb * 1e9 / 12  # fp32 weights + two AdamW moments
    layers, vocab = 8, 32000
    # per layer ~11 dim^2 (q, o, one kv head, ffn 3 x dim x 3dim), plus two vocab x dim tables
    a_, b_ = layers * 11, 2 * vocab
    dim = int((-b_ + math.sqrt(b_ * b_ + 4 * a_ * params)) / (2 * a_) // 64 * 64) or 64
    args = ModelArgs(
        dim=dim,
        n_layers=layers,
        n_heads=dim // 64,
        n_kv_heads=1,
        ffn_dim=dim * 3,
        vocab_size=vocab,
        max_seq_len=64,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = CheckpointConfig(dir=target, keep_last=0)
    ck = Checkpointer(target, model, opt, sched, args, {"world_size": 1}, cfg, 0, 1, {}, _Log())
    return ck, cfg


def plain_state(ck: Checkpointer) -> dict:
    state = ck._state()
    state["train"] = {"step": 1, "cursor": 1, "scheduler": 0, "rng": torch.get_rng_state()}
    return state


def plain_resume(ck: Checkpointer, path: str, set_state: bool = True) -> None:
    """What a trainer on plain DCP does to resume: load, then (set_state) put the state in
    place with set_state_dict."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = plain_state(ck)
    dcp.load(state, storage_reader=_plain_reader(path))
    if set_state:
        set_state_dict(
            ck.model,
            ck.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


def _plain_writer(path: str):
    if "://" not in path:
        return dcp.FileSystemWriter(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from triaxis.storage_client import s3_options

    return FsspecWriter(path, default_block_size=16 * 2**20, **s3_options())


def _plain_reader(path: str):
    if "://" not in path:
        return dcp.FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    from triaxis.storage_client import s3_options

    return FsspecReader(path, **s3_options())


def _rm(path: str) -> None:
    from triaxis import storage

    storage.remove(path)


def _clean(ours_dir: str, plain_dir: str) -> None:
    """Both sides' earlier files go at the same moment, and the filesystem settles before
    the next write: freeing a GB just before one side's fsync would tax that side alone."""
    _rm(plain_dir)
    for found in mf.list_checkpoints(ours_dir):
        _rm(found.path)
    if "://" not in ours_dir:
        os.sync()
        time.sleep(1.0)


def _fresh(target: str, root: str, cold: bool = False) -> None:
    """Before one side's save, the same for both: its own previous checkpoint removed (a
    retried save clears its folder too, untimed here for both), everything on disk, the
    filesystem settled; `cold`: then every file of this benchmark dropped from the page cache."""
    _rm(target)
    os.sync()
    time.sleep(1.0)
    if cold:
        drop_cache(root)


def compare(gb: float, repeats: int, root: str, with_async: bool) -> list[dict]:
    ours_dir, plain_dir = f"{root}/triaxis", f"{root}/plain"
    ck, cfg = build(gb, "", ours_dir)
    state = plain_state(ck)
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    rows: dict[str, list] = {}

    def add(name, ours, plain):
        rows.setdefault(name, []).append((ours, plain))
        if os.environ.get("BENCH_RAW"):  # every pair, to see the spread behind a median
            print(f"  raw {name:>22}: triaxis {ours[0]:.3f} s  DCP {plain[0]:.3f} s", flush=True)

    step = 0
    for _ in range(repeats):
        step += 1
        _clean(ours_dir, plain_dir)
        cfg.async_save = False
        path = mf.step_dir(ours_dir, step)
        local = "://" not in ours_dir
        save_ours = lambda: ck.save(step, step, block=True)  # noqa: E731
        # What a plain DCP trainer does at each save: take the state dict, then dcp.save it.
        save_plain = lambda: dcp.save(  # noqa: E731
            plain_state(ck), storage_writer=_plain_writer(plain_dir)
        )
        ops = {}
        if local:
            # Cold first: then the warm row's saves find the other side's fresh checkpoint
            # in the page cache, whoever goes first.
            ops["save sync (cold)"] = (
                save_ours,
                save_plain,
                lambda: _fresh(path, root, cold=True),
                lambda: _fresh(plain_dir, root, cold=True),
            )
            ops["save sync"] = (
                save_ours,
                save_plain,
                lambda: _fresh(path, root),
                lambda: _fresh(plain_dir, root),
            )
        else:
            ops["save sync"] = (save_ours, save_plain, None, None)
        ops |= {
            "resume": (lambda: ck.load(path), lambda: plain_resume(ck, plain_dir), None, None),
            "load in place": (
                lambda: ck.load(path),
                lambda: plain_resume(ck, plain_dir, set_state=False),
                None,
                None,
            ),
        }
        if local:
            for name in ("resume", "load in place"):
                ours, plain, _, _ = ops[name]
                ops[f"{name} (cold)"] = (
                    ours,
                    plain,
                    lambda: drop_cache(path),
                    lambda: drop_cache(plain_dir),
                )
        for name, (ours, plain, pre_ours, pre_plain) in ops.items():
            if step % 2:  # alternate who goes first: page cache and writeback favour neither
                got_ours, got_plain = measure(ours, pre_ours), measure(plain, pre_plain)
            else:
                got_plain, got_ours = measure(plain, pre_plain), measure(ours, pre_ours)
            add(name, got_ours, got_plain)
        if not with_async:
            continue
        step += 1
        _clean(ours_dir, plain_dir)
        cfg.async_save = True
        t0 = time.perf_counter()
        ck.save(step, step)
        blocking_ours = time.perf_counter() - t0
        ck.close()
        ck.writes = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
        total_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        fut = dcp.async_save(plain_state(ck), storage_writer=_plain_writer(plain_dir))
        blocking_plain = time.perf_counter() - t0
        getattr(fut, "upload_completion", fut).result()
        total_plain = time.perf_counter() - t0
        add("async blocking", (blocking_ours, 0, 0), (blocking_plain, 0, 0))
        add("async total", (total_ours, 0, 0), (total_plain, 0, 0))
        t_copy, c_copy, _ = measure(lambda: [t.clone() for t in _tensors(plain_state(ck))])
        add("staging copy", (t_copy, c_copy, 0), (t_copy, c_copy, 0))
    out = []
    for name, vals in rows.items():
        ours = statistics.median(v[0][0] for v in vals)
        plain = statistics.median(v[1][0] for v in vals)
        cpu_ours = statistics.median(v[0][1] for v in vals)
        cpu_plain = statistics.median(v[1][1] for v in vals)
        best_ours = min(v[0][0] for v in vals)
        best_plain = min(v[1][0] for v in vals)
        mem = max(v[0][2] - v[1][2] for v in vals)
        out.append(
            {
                "op": name,
                "gb": round(nbytes / 1e9, 2),
                "triaxis_s": round(ours, 3),
                "dcp_s": round(plain, 3),
                "ratio": round(ours / plain, 3) if plain else None,
                "best_ratio": round(best_ours / best_plain, 3) if best_plain else None,
                "cpu_ratio": round(cpu_ours / cpu_plain, 3) if cpu_plain else None,
                "triaxis_cpu_s": round(cpu_ours, 3),
                "dcp_cpu_s": round(cpu_plain, 3),
                "extra_peak_mib": round(mem / 2**20, 1),
            }
        )
    return out


def _tensors(state: dict):
    for v in state.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, torch.Tensor):
            yield v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, nargs="+", default=[1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--s3-gb", type=float, default=0.0)
    ap.add_argument("--no-async", action="store_true", help="skip the async-save rows")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"{'target':>6} {'op':>20} {'GB':>5} {'triaxis s':>10} {'DCP s':>8} {'ratio':>6} "
        f"{'best/best':>9} {'tx cpu s':>8} {'DCP cpu s':>9} {'cpu ratio':>9} "
        f"{'extra peak MiB':>14}   (medians of --repeats; best = fastest)"
    )

    def show(target: str, rows: list[dict]) -> None:
        for r in rows:
            print(
                f"{target:>6} {r['op']:>20} {r['gb']:>5} {r['triaxis_s']:>10.3f} "
                f"{r['dcp_s']:>8.3f} {r['ratio'] or 0:>6.2f} {r['best_ratio'] or 0:>9.2f} "
                f"{r['triaxis_cpu_s']:>8.3f} {r['dcp_cpu_s']:>9.3f} {r['cpu_ratio'] or 0:>9.2f} "
                f"{r['extra_peak_mib']:>14.1f}",
                flush=True,
            )

    print(f"load average at start: {os.getloadavg()}", flush=True)
    for gb in a.gb:
        root = tempfile.mkdtemp(prefix="ckbench_", dir=os.environ.get("BENCH_DIR"))
        try:
            show("local", compare(gb, a.repeats, root, with_async=not a.no_async))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if a.s3_gb:
        import boto3

        from tests.s3_server import serve_for_this_process

        server, endpoint = serve_for_this_process()

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        try:
            show("s3", compare(a.s3_gb, a.repeats, "s3://bench/run", with_async=False))
        finally:
            server.stop()
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
