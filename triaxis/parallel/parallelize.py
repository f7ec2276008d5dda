"""Apply parallelism to the single-device model from outside, in one fixed order.

0. float8 conversion (optional)  -- swaps block linears for Float8Linear first, as torchtitan
                                     does: every later step then wraps the float8 modules
                                     (float8.py);
1. tensor (+ sequence) parallel   -- must see plain nn.Linear/RMSNorm modules to swap their
                                     weights for DTensors sharded on the `tp` axis; an MoE
                                     block is replicated on `tp` instead (moe_tp.py);
1a. expert parallelism (expert.py) -- the MoE experts become DTensors sharded over `ep` and the
                                     blocks dispatch by all-to-all; before checkpointing (its
                                     recompute replays the all-to-all) and before FSDP, which
                                     then shards each rank's experts over `edp` only;
1b. LoRA adapters (lora.py)       -- after TP, to copy the placement TP gave each base weight
                                     (and leave TP's plan, which names plain Linears, as is);
                                     before checkpointing, compile and FSDP, so the adapters are
                                     recomputed, traced and sharded with their block;
2. activation checkpointing       -- wraps each (already TP-sharded) block, so recomputation
                                     replays the block's TP collectives too (block or op
                                     level, inputs optionally offloaded: activations.py);
3. torch.compile per block        -- after checkpointing, so the recompute region is traced
                                     into the compiled graph; before FSDP, whose hooks sit
                                     outside the compiled region. With activation offload the
                                     other way round (compile, then checkpoint): the offload's
                                     saved_tensors_hooks cannot be traced (Dynamo breaks the
                                     graph and, as checkpoint runs with Dynamo off, compiles
                                     nothing), so the compiled block runs inside an eager
                                     checkpoint whose hooks see only the block input;
4. FSDP (MiCS sharding)           -- last: shards whatever parameters the block now holds
                                     (DTensors on `tp`, or plain tensors) over the dp axes.
"""

from __future__ import annotations

import torch
from torch import nn

from triaxis.config import LoraConfig, ParallelConfig, TrainConfig
from triaxis.parallel.activations import apply_ac
from triaxis.parallel.dims import ParallelDims


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh,
    pcfg: ParallelConfig,
    tcfg: TrainConfig,
    device: torch.device,
    mp_dtype: torch.dtype | None,
    lora: LoraConfig | None = None,
) -> nn.Module:
    if dims.cp > 1:
        from triaxis.parallel.context import apply_cp

        apply_cp(model, mesh["cp"])
    if tcfg.float8 != "off":
        from triaxis.parallel.float8 import convert_float8, float8_all_gather

        model.float8_modules = convert_float8(
            model,
            tcfg.float8,
            tcfg.float8_min_dim,
            float8_all_gather(tcfg.float8, device, dims.dp_shard),
        )
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=pcfg.loss_parallel)
    expert_mesh = None
    if dims.ep > 1:
        from triaxis.parallel.expert import apply_ep

        expert_mesh = dims.build_expert_mesh(device.type)
        apply_ep(model, expert_mesh["ep"])
    if lora is not None and lora.enabled:
        from triaxis.parallel.lora import apply_lora

        apply_lora(model, lora)
    compile_inside = tcfg.compile and pcfg.activation_offload
    if compile_inside:
        # In place (Module.compile): an OptimizedModule under the checkpoint wrapper would put
        # `_orig_mod.` into the state-dict keys, which DCP strips only from an outer one.
        for block in model.layers.children():
            block.compile(backend=tcfg.compile_backend)
    if pcfg.activation_checkpoint != "none":
        # The offload hooks' owner stays reachable for logs and tests (None without offload).
        model.activation_offload = apply_ac(
            model,
            pcfg.activation_checkpoint,
            pcfg.ac_every,
            pcfg.ac_selective,
            pcfg.activation_offload,
            device,
        )
    if tcfg.compile and not compile_inside:
        compile_blocks(model, tcfg.compile_backend)
    if dims.fsdp_enabled:
        apply_fsdp(model, mesh, dims, pcfg, device, mp_dtype, expert_mesh)
    elif pcfg.hierarchical == "on":
        from triaxis.parallel.hierarchical import refuse_without_shards

        refuse_without_shards(dims)
    return model


def compile_blocks(model: nn.Module, backend: str) -> None:
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, backend=backend))


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    """Megatron-style TP with sequence parallelism: activations between blocks are sharded on
    the sequence dim (Shard(1)); each block gathers them for attention/MLP and reduce-scatters
    back. Column-wise q/k/v and w1/w3, row-wise wo and w2: one collective pair per sub-layer."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # A pipeline stage may lack the embedding or the head: plan only the modules it holds.
    ends = {
        # Vocabulary-sharded embedding; its output leaves sequence-sharded for the first norm.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # Logits stay vocabulary-sharded for loss_parallel, else are gathered for plain CE.
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    parallelize_module(
        model, tp_mesh, {k: v for k, v in ends.items() if getattr(model, k, None) is not None}
    )
    if model.args.tie_embeddings and model.output is not None:
        # Both plans shard the shared (vocab, dim) weight on dim 0; re-tie the one DTensor.
        model.output.weight = model.tok_embeddings.weight
    from triaxis.model.moe import MoE
    from triaxis.parallel.moe_tp import moe_tp_plan, replicate_moe

    for block in model.layers.values():
        if isinstance(block.feed_forward, MoE):
            replicate_moe(block.feed_forward, tp_mesh)
        ffn_plan = (
            moe_tp_plan()
            if isinstance(block.feed_forward, MoE)
            else {
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                # (x, rope, document mask): the rope table and the mask span the whole
                # sequence on every rank already; only x is gathered.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None),
                    desired_input_layouts=(Replicate(), None, None),
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                **ffn_plan,
            },
        )


def fsdp_mesh(mesh, dims: ParallelDims):
    """The data-parallel sub-mesh FSDP uses: 2-D (replicate, shard) = HSDP = MiCS, else 1-D.

    With dp_shard = 1 the 2-D mesh degenerates to plain data parallelism: no sharding, one
    all-reduce per step.
    """
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"  # cp ranks share model states too
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", shard]
    return mesh[shard]


def apply_fsdp(
    model: nn.Module,
    mesh,
    dims: ParallelDims,
    pcfg: ParallelConfig,
    device: torch.device,
    mp_dtype: torch.dtype | None,
    expert_mesh=None,
) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": fsdp_mesh(mesh, dims)}
    if mp_dtype is not None:
        # bf16 compute, fp32 gradient reduction: sums over many ranks keep their precision.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    if pcfg.cpu_offload:
        # Pinned host memory needs an accelerator; on CPU the policy is a plain no-op move.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # MiCS hierarchical collectives (a partition group spanning nodes); None: FSDP's flat ones.
    # Building their groups is collective: every rank resolves the same answer from dims + env.
    from triaxis.parallel.hierarchical import hierarchical_comms

    comms = hierarchical_comms(pcfg.hierarchical, dims)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        reshard = pcfg.reshard_after_forward and i < len(blocks) - 1
        if expert_mesh is not None and hasattr(block.feed_forward, "experts"):
            # Each rank's experts (already split over ep) are shared by the edp ranks only:
            # sharded and gradient-averaged there, before the block takes the rest.
            from triaxis.parallel.expert import expert_fsdp_mesh

            experts_kwargs = {**kwargs, "mesh": expert_fsdp_mesh(expert_mesh, dims)}
            fully_shard(block.feed_forward.experts, reshard_after_forward=reshard, **experts_kwargs)
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    # Root: embedding, final norm and head (tied weights included) form one more group.
    fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **kwargs)
    if comms is not None:
        for module in [*blocks, model]:
            module.set_custom_all_gather(comms[0])
            module.set_custom_reduce_scatter(comms[1])


def set_grad_sync(model: nn.Module, dims: ParallelDims, last_micro_step: bool) -> None:
    """MiCS two-hop gradient sync for one micro-batch of a gradient-accumulation cycle.

    Sharded (dp_shard > 1): reduce-scatter inside the partition group on every micro-batch, so
    each rank only ever holds its gradient shard; all-reduce across groups (dp_replicate) only
    on the last micro-batch. Plain data parallel (dp_shard = 1): no communication at all until
    the last micro-batch, like DDP's no_sync.
    """
    if not dims.fsdp_enabled:
        return
    if dims.shard_size > 1:
        model.set_requires_all_reduce(last_micro_step)
    else:
        model.set_requires_gradient_sync(last_micro_step)
