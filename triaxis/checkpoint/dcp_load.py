"""Resuming from a checkpoint (the load half of dcp.Checkpointer): finding the latest valid
one, checking it fits this run's model, and loading the whole training state in place, every
item verified against its write-time checksum. Checkpoints that fail are set aside, never
deleted. The saving half and the commit protocol are in dcp.py.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from triaxis import storage
from triaxis.checkpoint import checksum, dcp_io
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp_io import load_model_weights
from triaxis.checkpoint.lora_resume import check_lora_resume
from triaxis.checkpoint.save_errors import short
from triaxis.errors import UserError
from triaxis.model.llama import ModelArgs
from triaxis.parallel.host import host_all_gather_object

_TRAINING_KNOBS = (
    "max_seq_len",
    "moe_capacity_factor",
    "moe_aux_loss_coef",
    "moe_bias_update_rate",
)
"""ModelArgs fields a resumed run may change: they shape no tensor of the checkpoint."""
_MODEL_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(ModelArgs) if f.default is not dataclasses.MISSING
}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Resuming:
    """What a Checkpointer needs to resume; it sets model, optimizer, scheduler, model_args
    (a dict), meta, cfg, root, rank, world_size, is_main, ctl, group and log."""

    def _gather(self, obj, group) -> list:
        if group is None:
            return [obj]
        return host_all_gather_object(obj, group, self.world_size)

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def resume(self, mode: str = "auto") -> tuple[mf.Found, dict] | None:
        """Load the latest valid checkpoint ((it, {"step", "cursor"})), or None for a fresh
        start. Invalid ones are skipped with a warning and set aside (never deleted); if
        every checkpoint is invalid, or `mode` is "none" in a folder that holds some, the run
        stops with one line: it never starts over them."""
        found_all = mf.list_checkpoints(self.root)
        if mode == "none":
            if found_all:
                raise UserError(
                    f"checkpoint.resume=none, but {self.root} already holds "
                    f"{len(found_all)} committed checkpoint(s) (latest step "
                    f"{found_all[-1].step}) that this run would mix with or replace; point "
                    "--checkpoint.dir at another folder (or resume with "
                    "--checkpoint.resume=auto)"
                )
            return None
        skipped: list[tuple[mf.Found, str]] = []
        for found in reversed(found_all):
            reason = self._agreed(self._cheap_problems(found.path))
            state = None
            if reason is None:
                self.check_compatible(found.path)
                saved = mf.read_meta(found.path).get("config", "")
                if why := check_lora_resume(found.path, saved, self.meta.get("config", "")):
                    raise UserError(why)  # not a bad checkpoint: never set aside
                try:
                    state = self.load(found.path)
                except UserError as err:  # a checksum or unsafe metadata: every rank sees it
                    reason = str(err)
            if state is not None:
                self._set_aside(skipped)
                return found, state
            self.log.warn(f"skipping checkpoint {found.path}: {reason}")
            skipped.append((found, reason))
        if skipped:
            names = ", ".join(f.path for f, _ in skipped)
            raise UserError(
                f"every checkpoint under {self.root} is invalid ({names}; first problem: "
                f"{skipped[0][1]}); nothing was changed. Repair them (`triaxis ckpt verify` "
                "names each bad file), or start fresh with --checkpoint.resume=none and "
                "another --checkpoint.dir"
            )
        return None

    def find_resume(self) -> mf.Found | None:
        """The checkpoint `resume` would load (it is loaded: the state is restored)."""
        got = self.resume("auto")
        return None if got is None else got[0]

    def _cheap_problems(self, path: str) -> str | None:
        """This rank's view of a checkpoint before loading it: manifest, names, file sizes;
        for legacy manifests (no per-item checksums) the ranks share the full check."""
        meta, problems = mf.check(path)
        if not problems and mf.is_legacy(meta) and self.cfg.verify_on_resume:
            files = sorted(meta["files"])
            problems = mf.verify(path, only=files[self.rank :: self.world_size])
        return "; ".join(problems) or None

    def _agreed(self, reason: str | None) -> str | None:
        reasons = self._gather(reason, self.ctl)
        return next((r for r in reasons if r), None)

    def _set_aside(self, skipped: list[tuple[mf.Found, str]]) -> None:
        """Invalid checkpoints newer than the one resumed would be replaced as training
        reaches their steps: rank 0 moves each to step_XXXXXXXX.invalid, for repair."""
        if self.is_main:
            for found, _ in skipped:
                dest = f"{found.path}.invalid"
                n = 1
                while storage.exists(dest):
                    dest, n = f"{found.path}.invalid{n}", n + 1
                try:
                    storage.move(found.path, dest)
                except Exception as err:  # noqa: BLE001  (every rank waits below)
                    self.log.warn(
                        f"could not move invalid checkpoint {found.path} aside "
                        f"({short(err)}); move or remove it before this run "
                        f"reaches step {found.step}"
                    )
                    continue
                self.log.warn(f"moved invalid checkpoint {found.path} to {dest}")
        _barrier()

    def check_compatible(self, path: str, meta: dict | None = None) -> None:
        # A field newer than the checkpoint was at its default when the checkpoint was written.
        meta = meta or mf.read_meta(path)
        saved = {**_MODEL_DEFAULTS, **meta["model"]}
        was, now = saved.get("n_experts", 0), self.model_args.get("n_experts", 0)
        if bool(was) != bool(now):
            kinds = ("a dense model", "a mixture of experts (model.n_experts={})")
            raise UserError(
                f"checkpoint {path} holds {kinds[bool(was)].format(was)} and this run builds "
                f"{kinds[bool(now)].format(now)}; set --model.n_experts={was} (or the "
                "checkpoint's preset), point --checkpoint.dir elsewhere, or start fresh with "
                "--checkpoint.resume=none"
            )
        diffs = [
            f"{k}={saved.get(k)} (checkpoint) vs {v} (this run)"
            for k, v in self.model_args.items()
            if saved.get(k) != v and k not in _TRAINING_KNOBS
        ]
        if diffs:
            raise UserError(
                f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}."
                " Use the checkpoint's [model] settings, point --checkpoint.dir "
                "elsewhere, or start fresh with --checkpoint.resume=none"
            )

    def load(self, path: str) -> dict:
        """Load the whole training state in place, checking every item read against its
        write-time checksum (unless checkpoint.verify_on_resume=false); returns
        {"step", "cursor", "loop_state"}. DCP copies each tensor into the state dict's own
        tensors, which are the model's and the optimizer's (get_state_dict shares them): where
        every one is, the state is restored by the load itself, as with plain DCP, and a
        set_state_dict would only copy it onto itself once more."""
        meta = mf.load_manifest(path)
        self.check_compatible(path, meta)
        state = self._state()
        state["train"] = {"step": 0, "cursor": 0, "scheduler": 0, "rng": torch.get_rng_state()}
        expected = dcp_io.expected_files(meta) if self.cfg.verify_on_resume else None
        # Keep this rank's own param groups: DCP stores one copy of their parameter lists
        # (rank 0's), which names none of another pipeline stage's parameters. Their
        # hyperparameters come from the config, the lr from the schedule (set below).
        groups = state["optim"].pop("param_groups")
        dcp_io.load(state, path, expected, self.group, algorithm=checksum.of_manifest(meta))
        state["optim"]["param_groups"] = groups
        if not dcp_io.loaded_in_place(state, self.model, self.optimizer):
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )
        dcp_io.restore_schedule(self.scheduler, self.optimizer, int(state["train"]["scheduler"]))
        torch.set_rng_state(state["train"]["rng"])
        return {
            "step": int(state["train"]["step"]),
            "cursor": int(state["train"]["cursor"]),
            "loop_state": meta.get("loop_state") or {},
        }

    def load_initial(self, path: str) -> None:
        """Model weights only (fine-tuning from e.g. `triaxis import-hf`), into any layout."""
        if not storage.exists(storage.join(path, mf.META)):
            raise UserError(
                f"checkpoint.initial={path} is not a triaxis checkpoint (no "
                f"{mf.META}); create one with `triaxis import-hf` or point at a "
                "step_XXXXXXXX folder"
            )
        meta = dcp_io.checked(path)
        self.check_compatible(path, meta)
        # A LoRA run starts from base weights: its fresh adapters are not in the checkpoint.
        from triaxis.parallel.lora import is_adapter

        load_model_weights(self.model, path, meta, skip=is_adapter)
