"""The host copy an async save writes from: allocated once, refilled at every save.

DCP's FileSystemWriter.stage (what an async save used to call) copies the whole state -- model
and AdamW moments, ~15 GB a rank at the 1b shape -- into freshly allocated pageable host memory
at every save, all of it while training waits. DCP's DefaultStager (torch >= 2.13:
compat.REUSABLE_STAGER; older releases keep the writer's own copy) keeps the host buffers of the
tensors it staged before and copies into them;
pinned on CUDA, so the device-to-host copy runs at full speed (pinning needs an accelerator:
plain host memory elsewhere). Reuse is safe because one save is in flight at a time: the next
stage starts after the previous write ended (Checkpointer.save waits first).
"""

from __future__ import annotations

import torch

from triaxis.parallel.compat import REUSABLE_STAGER


class ReusedStaging:
    """stage(state) -> the state's host copy, in the buffers of the previous stage."""

    def __init__(self):
        self._stager = None

    def stage(self, state: dict, writer) -> dict:
        from torch.distributed.checkpoint import staging

        if not REUSABLE_STAGER:  # an older torch: the writer's own, fresh copy every save
            return writer.stage(state)
        # What the writer's own stage sets: the state it writes is already on the host.
        writer.per_thread_copy_ahead = 0
        if self._stager is None:
            pin = (
                any(isinstance(t, torch.Tensor) and t.is_cuda for t in _leaves(state))
                and torch.cuda.is_available()
            )
            self._stager = staging.DefaultStager(
                staging.StagingOptions(
                    use_pinned_memory=pin,
                    use_shared_memory=False,
                    use_async_staging=False,  # the copy is what must end before training goes on
                    use_non_blocking_copy=False,
                )
            )
        return self._stager.stage(state)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj
