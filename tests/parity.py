"""Train the same tiny model under a layout and under one process; collect what to compare."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.helpers import train_args
from triaxis.config import load_config

BASE = {
    "model.preset": "tiny",
    "data.seq_len": "32",
    "train.steps": "5",
    "train.lr": "3e-3",
    "train.warmup_steps": "2",
    "train.global_batch": "8",
    "train.val_every": "0",
    "train.device": "cpu",
    "checkpoint.interval": "0",
    "checkpoint.save_final": "false",
    "metrics.log_every": "1",
    "metrics.tensorboard": "false",
    "metrics.progress": "false",
}


def make_config(data: str, run_dir: str, **overrides: str):
    values = {**BASE, "data.path": data, "train.run_dir": run_dir}
    values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return load_config(None, [f"--{k}={v}" for k, v in values.items()])


def local_state_bytes(trainer) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank actually holds."""

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in trainer.model.parameters())
    optim = 0
    for state in trainer.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.ndim > 0:
                optim += local(v).numel() * local(v).element_size()
    return {"params": params, "optim": optim}


def train_collect(
    rank: int, world: int, data: str, run_dir: str, overrides: dict, planner=None
) -> dict:
    """Worker body (also used with world=1 in-process): train, return losses and full weights
    (and the [parallel] section that ran). `planner`: parallel.auto's (plan.auto.auto_layout)."""
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(data, run_dir, **overrides)
    trainer = Trainer(cfg, init_distributed("cpu"), planner)
    result = trainer.fit()
    # Every rank gets the full tensors of what it holds (cpu_offload=True would keep only
    # rank 0's, and pipeline ranks hold different stages).
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    out = {
        "losses": result.losses,
        "val_losses": result.val_losses,
        "bytes": local_state_bytes(trainer),
        "parallel": trainer.cfg.parallel,
        "micro_batch": trainer.cfg.train.micro_batch,
    }
    # With pipelining each pipeline rank holds different stages: those of dp/tp rank 0 report.
    if rank == 0 or (
        trainer.pipeline is not None
        and trainer.dims.coords(rank)["pp"] != 0
        and trainer.dims.dp_rank(rank) == 0
        and trainer.dims.coords(rank)["tp"] == 0
    ):
        out["params"] = {k: v.detach().cpu().clone() for k, v in full.items()}
    else:
        out["params"] = {}
    return out


ADAM_EPS_ELEMENTS = 2
"""Elements of a parameter tensor allowed past the absolute bound (see assert_same_run)."""
LR_STEP = float(BASE["train.lr"])
"""The largest AdamW update of one element in one step of these runs (the peak lr)."""


def assert_same_run(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert sorted(got["losses"]) == sorted(ref["losses"]) and len(ref["losses"]) >= 5
    for step, ref_loss in ref["losses"].items():
        assert abs(got["losses"][step] - ref_loss) <= rtol * abs(ref_loss), (
            f"step {step}: loss {got['losses'][step]!r} vs single-process {ref_loss!r}"
        )
    assert got["params"].keys() == ref["params"].keys(), set(got["params"]) ^ set(ref["params"])
    for name, ref_p in ref["params"].items():
        # Relative error of the whole tensor. Element-wise relative error is meaningless for
        # near-zero weights, so elements are held to an absolute bound (1e-5) instead -- all but
        # ADAM_EPS_ELEMENTS of them, which may differ by up to one learning-rate step: AdamW moves
        # an element by lr * g / (|g| + eps), eps = 1e-8, so where a gradient is itself at the
        # rounding level (|g| ~ eps) the update follows the rounding, and another fp32 summation
        # order (more ranks, other micro-batches) shifts it by up to lr * |dg| / eps. Measured
        # (torch 2.11, dp_shard=2 x 2 micro-batches): one output.weight element had g = 1.14e-9
        # vs 1.22e-9 at step 1 (tensor rms 7.4e-3): 1.5e-3 * (0.1087 - 0.1023) = 9.6e-6
        # predicted, 1.02e-5 measured, of 16,448 elements. A layout bug moves whole rows.
        diff = (got["params"][name] - ref_p).float()
        rel = float(diff.norm() / ref_p.float().norm().clamp_min(1e-12))
        assert rel <= rtol, f"{name}: relative error {rel:.2e} > {rtol:.0e}"
        over = diff.abs().flatten()
        over = over[over > 1e-5].tolist()
        assert len(over) <= ADAM_EPS_ELEMENTS and max(over, default=0.0) <= LR_STEP, (
            f"{name}: {len(over)} elements differ by more than 1e-5 (max abs diff "
            f"{diff.abs().max():.2e}); at most {ADAM_EPS_ELEMENTS}, each within {LR_STEP:.0e}"
        )


def tiny_train_args(data, run_dir, *extra) -> list[str]:
    """Command-line overrides of a tiny, quiet training run (for CLI-level tests)."""
    return train_args(data, run_dir, *extra, seq_len=64)
