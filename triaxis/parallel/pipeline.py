"""Pipeline parallelism on torch.distributed.pipelining.

Each rank builds only its own stages: the single-device Transformer with the blocks of other
stages deleted (and no embedding / head where they live elsewhere). Blocks keep their global
index as their name, so parameter names, initial weights and checkpoint keys are those of the
full model. Every stage module is then parallelized like a whole model (TP -> AC -> compile ->
FSDP) on the rank's (dp, tp) sub-mesh.

Micro-batches are the gradient-accumulation steps: the schedule splits the rank's local batch
(micro_batch x grad_accum samples) into grad_accum chunks, averages each chunk's loss and scales
the gradients by 1/grad_accum, which is exactly what the non-pipelined loop does.
With FSDP, the pipeline accumulates unsharded gradients over the micro-batches of a step and runs
both reduction hops once, after the last one (reduce-scatter in the partition group, then the
all-reduce across groups): PyTorch's pipelining drives FSDP's backward itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from triaxis.errors import UserError
from triaxis.model.llama import ModelArgs, Transformer
from triaxis.model.moe import moe_layers
from triaxis.parallel.compat import pipeline_stage
from triaxis.parallel.partition import MULTI, SINGLE, Stage, schedule_problem, stage_rank


def check_schedule(name: str, pp: int, v: int, n_microbatches: int) -> None:
    """The rules of each schedule, as one-line errors that list the valid choices: this
    PyTorch has it, and `partition.schedule_problem` (the planner's rule too)."""
    import torch.distributed.pipelining.schedules as S

    available = [k for k, cls in {**SINGLE, **MULTI}.items() if hasattr(S, cls)]
    if name not in available:
        raise UserError(
            f"parallel.pp_schedule={name!r} is not in this PyTorch "
            f"({torch.__version__}); choose one of {available}"
        )
    problem = schedule_problem(name, pp, v, n_microbatches)
    if problem:
        raise UserError(problem)


def build_stage_module(args: ModelArgs, stage: Stage, num_stages: int) -> Transformer:
    """The meta-device model restricted to one stage's blocks (and ends)."""
    with torch.device("meta"):
        model = Transformer(args)
    for i in range(args.n_layers):
        if i not in stage.blocks:
            del model.layers[str(i)]
    if stage.index != 0:
        model.tok_embeddings = None
    if stage.index != num_stages - 1:
        model.norm = None
        model.output = None
    return model


class LocalStages(nn.Module):
    """A view of this rank's stage modules under the full model's names (no copies).

    State dicts, the optimizer, gradient clipping and initialization all see one module whose
    keys are the single-device model's (restricted to what this rank holds), so checkpoints are
    layout-independent with pipelining too.
    """

    def __init__(self, parts: list[Transformer]):
        super().__init__()
        self.parts = parts  # a plain list: not registered twice under another prefix
        self.layers = nn.ModuleDict()
        for part in parts:
            for name, block in part.layers.items():
                self.layers[name] = block
            for end in ("tok_embeddings", "norm", "output"):
                if getattr(part, end, None) is not None:
                    self.add_module(end, getattr(part, end))

    def init_weights(self, seed: int) -> None:
        for part in self.parts:
            part.init_weights(seed)

    def materialize(self, device) -> None:
        for part in self.parts:
            part.materialize(device)


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(
        self,
        parts: list[nn.Module],
        stages: list[Stage],
        num_stages: int,
        pp_group,
        schedule: str,
        n_microbatches: int,
        device: torch.device,
        loss_fn,
    ):
        import torch.distributed.pipelining.schedules as S

        self.num_stages = num_stages
        self.has_first = any(s.index == 0 for s in stages)
        self.has_last = any(s.index == num_stages - 1 for s in stages)
        self.pp_group, self.device = pp_group, device
        self.stages = [
            pipeline_stage(part, s.index, num_stages, device, group=pp_group)
            for part, s in zip(parts, stages)
        ]
        for stage, part in zip(self.stages, parts):
            _keep_moe_state(stage, part)
        # For the forward-only walk of eval(): who holds each stage, and this rank's modules.
        pp = dist.get_world_size(pp_group)
        self.stage_ranks = [stage_rank(i, pp, schedule) for i in range(num_stages)]
        self.parts_by_index = {s.index: part for part, s in zip(parts, stages)}
        self.loss_fn, self._n_microbatches = loss_fn, n_microbatches
        cls = getattr(S, SINGLE.get(schedule) or MULTI[schedule])
        target = self.stages[0] if schedule in SINGLE else self.stages
        self.schedule = cls(
            target, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True
        )

    def step(
        self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward + backward of the local batch (inputs, targets) through the schedule;
        returns the mean micro-batch loss, the same on every rank of the pipeline. `doc_ids`
        (document masking, of the inputs): every rank holds the batch and derives them itself,
        so each stage gets them as a keyword argument (split into micro-batches like the
        inputs) instead of receiving them from the previous stage."""
        args = (inputs,) if self.has_first else ()
        kwargs = {} if doc_ids is None else {"doc_ids": doc_ids}
        losses: list[torch.Tensor] = []
        if self.has_last:
            kwargs |= {"target": targets, "losses": losses}
        self.schedule.step(*args, **kwargs)
        loss = (
            torch.stack([local_value(x).detach() for x in losses]).mean()
            if losses
            else torch.zeros((), device=inputs.device)
        )
        dist.all_reduce(loss, group=self.pp_group)  # only the last stage's rank adds a value
        return loss

    @torch.no_grad()
    def eval(
        self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward only, the mean micro-batch loss on every rank of the pipeline.

        Not `schedule.eval`: the runtime schedules (looped-bfs, interleaved, zbv, dualpipev)
        replay their training action list with backward switched off, which fails on the
        V-shaped ones (a backward-input action on a stage without backward) and leaves the
        other ranks waiting in a receive. Validation is rare, so a plain walk is enough:
        micro-batch by micro-batch, stage by stage, each activation sent once to the next
        stage's rank. Every rank walks the same order, so no send waits on a receive that
        comes later."""
        n = self._n_microbatches
        device = inputs.device
        docs = doc_ids.chunk(n) if doc_ids is not None else [None] * n
        inputs, targets = inputs.chunk(n), targets.chunk(n)
        total = torch.zeros((), device=device)
        for m in range(n):
            h = inputs[m]
            for s in range(self.num_stages):
                owner, mine = self.stage_ranks[s], self.parts_by_index.get(s)
                if mine is None:
                    continue
                if s > 0 and self.stage_ranks[s - 1] != owner:
                    h = self._recv(self.stage_ranks[s - 1], device)
                h = mine(h, doc_ids=docs[m])
                if s == self.num_stages - 1:
                    total += local_value(self.loss_fn(h, targets[m])).detach().float()
                elif self.stage_ranks[s + 1] != owner:
                    self._send(h, self.stage_ranks[s + 1])
        loss = total / n if self.has_last else total
        dist.all_reduce(loss, group=self.pp_group)  # only the last stage's rank adds a value
        return loss

    def _send(self, t: torch.Tensor, pp_rank: int) -> None:
        t = local_value(t).contiguous()
        # A header first: the receiver learns dtype and shape (autocast, sequence sharding).
        # Built on the host, sent from the device (NCCL); self.device rather than t.device,
        # the same on a GPU, lets the CPU proxy of that rule tell them apart (parallelism.md).
        header = torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape], dtype=torch.int64)
        dst = dist.get_global_rank(self.pp_group, pp_rank)
        dist.send(
            torch.cat([header, header.new_zeros(8 - len(header))]).to(self.device),
            dst,
            group=self.pp_group,
        )
        dist.send(t, dst, group=self.pp_group)

    def _recv(self, pp_rank: int, device: torch.device) -> torch.Tensor:
        src = dist.get_global_rank(self.pp_group, pp_rank)
        header = torch.zeros(8, dtype=torch.int64, device=device)
        dist.recv(header, src, group=self.pp_group)
        dtype, ndim, *shape = header.tolist()
        out = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=device)
        dist.recv(out, src, group=self.pp_group)
        return out


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _keep_moe_state(stage, part: nn.Module) -> None:
    """On its first step a PipelineStage runs its module once more to learn the output shapes
    (torch 2.13: `_prepare_forward_infra`), in training mode, on the first micro-batch or, past
    the first stage, on uninitialized tensors. An MoE block counts the tokens it routes then
    (the balancing state a checkpoint carries) and records its figures: that forward's
    counts and figures are taken back, so the bias moves as one process's does."""
    layers = moe_layers(part)
    infer = getattr(stage, "_prepare_forward_infra", None)
    if not layers or infer is None:
        return

    def prepare(*args, **kwargs):
        saved = [
            (m.router.tokens_since_update.clone(), m.stats, m.stats_sum, m.stats_forwards)
            for _, m in layers
        ]
        try:
            return infer(*args, **kwargs)
        finally:
            for (_, m), (counts, stats, stats_sum, forwards) in zip(layers, saved):
                m.router.tokens_since_update.copy_(counts)
                m.stats, m.stats_sum, m.stats_forwards = stats, stats_sum, forwards

    stage._prepare_forward_infra = prepare


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A loss from loss_parallel is a replicated DTensor; its local value is the full loss (and
    a plain tensor is itself)."""
    return t.to_local() if hasattr(t, "to_local") else t
