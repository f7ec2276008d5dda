"""`triaxis train` in one process: join the process group, build the trainer, hold the run
folder's lock while it trains, and leave cleanly on an error."""

from __future__ import annotations

from triaxis.config import Config
from triaxis.errors import UserError, as_user_error
from triaxis.parallel.rules import Planner
from triaxis.train.distributed import init_distributed, leave_on_error, shutdown
from triaxis.train.loop import Trainer, TrainResult
from triaxis.train.resilience import hold_run_lock, lock_folders


def run(cfg: Config, planner: Planner | None = None, hf_output=None) -> TrainResult:
    """Train per `cfg`, in this process (joining the process group torchrun describes).
    `planner` chooses the layout for parallel.auto (the command line passes the planner's);
    `hf_output(cfg, rank, world, log)` builds checkpoint.hf's commit hook (the command line
    passes triaxis.hf.run_output.HfOutput: the trainer sits below triaxis.hf)."""
    env = init_distributed(
        cfg.train.device, cfg.train.dist_timeout_s, need_group=cfg.parallel.fsdp_always
    )
    try:
        trainer = Trainer(cfg, env, planner)  # checks the config and data, writes nothing
        if cfg.checkpoint.hf != "off":
            if hf_output is None:
                raise UserError(
                    f"checkpoint.hf={cfg.checkpoint.hf!r} needs the Hugging Face writer: "
                    "train with the triaxis command, or pass run(..., hf_output=HfOutput)"
                )
            trainer.ckpt.on_commit = hf_output(cfg, env.rank, env.world_size, trainer.log)
        # Before the first write (resume may remove a partial checkpoint): one run per folder.
        with hold_run_lock(lock_folders(cfg.checkpoint_dir(), cfg.train.run_dir), env.is_main):
            return trainer.fit()
    except BaseException as err:
        # An OS error on the user's own path (a read-only run folder, missing data) is one
        # line and exit 2 on every path: one process, or a rank under the launcher.
        user = as_user_error(err, cfg.user_paths())
        leave_on_error(env, user)  # a rank of a job exits here, skipping the barrier below
        if user is err:
            raise
        raise user from err
    finally:
        shutdown(env)
