"""Sharded checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Every rank writes its own shards; the state-dict keys are the single-device parameter names
(get_state_dict strips FSDP, TP and wrapper prefixes), so a checkpoint saved under one layout
loads under any other. A save goes to `step_XXXXXXXX.partial/`; after every rank has written,
rank 0 adds `triaxis.json` (step, model shape, layout) and renames the folder to `step_XXXXXXXX`,
an atomic rename: a crash mid-save never leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from triaxis.errors import UserError

# One process without a process group is a supported case (generation, single-device runs).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

META = "triaxis.json"
PREFIX = "step_"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Committed checkpoints in `folder`, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META).read_text())


class Checkpointer:
    def __init__(self, folder: str, model, optimizer, scheduler, model_args, layout: dict,
                 keep_last: int, is_main: bool, data_path: str = ""):
        self.folder = Path(folder)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model_args = dataclasses.asdict(model_args)
        self.layout, self.keep_last, self.is_main = layout, keep_last, is_main
        self.data_path = data_path

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, cursor: int) -> Path:
        final = self.folder / f"{PREFIX}{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        state = self._state()
        state["train"] = {"step": step, "cursor": cursor,
                          "scheduler": self.scheduler.state_dict()["last_epoch"]}
        dcp.save(state, checkpoint_id=str(partial))
        _barrier()  # every rank's shards have landed before the commit
        if self.is_main:
            meta = {"step": step, "cursor": cursor, "model": self.model_args,
                    "layout": self.layout, "data_path": self.data_path}
            (partial / META).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            self._retain()
        _barrier()
        return final

    def _retain(self) -> None:
        if self.keep_last <= 0:
            return
        for old in complete_checkpoints(self.folder)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def check_compatible(self, path: Path) -> None:
        saved = read_meta(path)["model"]
        diffs = [f"{k}={saved.get(k)} (checkpoint) vs {v} (this run)"
                 for k, v in self.model_args.items() if saved.get(k) != v and k != "max_seq_len"]
        if diffs:
            raise UserError(f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}."
                            " Use the checkpoint's [model] settings, point --checkpoint.dir "
                            "elsewhere, or start fresh with --checkpoint.resume=none")

    def load(self, path: Path) -> dict:
        """Load model, optimizer and schedule in place; returns {"step", "cursor"}."""
        self.check_compatible(path)
        state = self._state()
        state["train"] = {"step": 0, "cursor": 0, "scheduler": 0}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        sched = self.scheduler.state_dict()
        sched["last_epoch"] = int(state["train"]["scheduler"])
        sched["_step_count"] = sched["last_epoch"] + 1
        self.scheduler.load_state_dict(sched)
        # LambdaLR recomputes the lr lazily; set it for the restored step now.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        return {"step": int(state["train"]["step"]), "cursor": int(state["train"]["cursor"])}


def load_model_weights(model, path: str | Path) -> None:
    """Model weights only (for generation / fine-tuning), into a model of any layout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))
