"""Automatic pipeline-stage partitioning: contiguous runs of blocks over pp x v stages.

The embedding sits on the first stage, the final norm + LM head + loss on the last. Each block
(and the embedding and head) has a compute cost (FLOPs per token) and a memory cost (bytes of
parameters, gradients, AdamW states, and the activations of the micro-batches that are in
flight on that stage's rank). The partitioner minimizes the largest stage cost, where a stage's
cost blends the two, each normalized by its total:

    cost = (1 - w) * flops / total_flops + w * bytes / total_bytes

w = 0 balances compute (speed), w = 1 balances memory. Exact, by dynamic programming over
contiguous splits (O(stages x blocks^2): instant even for 126 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from triaxis.errors import UserError
from triaxis.model.args import ModelArgs, block_param_count

# The runtime's pipeline schedules -> torch.distributed.pipelining classes (here, without torch,
# so the planner can name and size them). One stage per rank:
SINGLE = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
# pp_virtual_stages >= 2 stages per rank:
MULTI = {
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
# Schedules whose ranks hold stages r and 2p-1-r (a "V", exactly 2 per rank), the others loop:
# r, r+p, r+2p, ...
V_SCHEDULES = ("zbv", "dualpipev")


def stages_per_rank(schedule: str, wanted: int) -> int:
    """The pp_virtual_stages `schedule` runs closest to `wanted`: 1 for the single-stage ones,
    exactly 2 for the V ones, at least 2 for the other multi-stage ones."""
    if schedule in SINGLE:
        return 1
    return 2 if schedule in V_SCHEDULES else max(2, wanted)


def schedule_problem(name: str, pp: int, v: int, n_microbatches: int) -> str | None:
    """Why `name` cannot run pp ranks x v stages per rank over n_microbatches micro-batches per
    step (one line naming the rule and the fix), or None when it can. The one rule the planner
    (`plan.search.schedule_fits`) and the trainer (`pipeline.check_schedule`) both apply."""
    if name in SINGLE and v != 1:
        return (
            f"pp_schedule={name} runs one stage per rank but pp_virtual_stages={v}; "
            "set pp_virtual_stages=1 or use interleaved-1f1b / interleaved-zb"
        )
    if name in MULTI and v < 2:
        return (
            f"pp_schedule={name} needs pp_virtual_stages >= 2 (got {v}); set "
            "--parallel.pp_virtual_stages=2 or use 1f1b / gpipe"
        )
    if name in V_SCHEDULES and v != 2:
        return f"pp_schedule={name} needs exactly pp_virtual_stages=2 (got {v})"
    need = {"gpipe": 1, "1f1b": pp}.get(name, pp * v if name in V_SCHEDULES else pp)
    if n_microbatches < need:
        return (
            f"pp_schedule={name} with pp={pp}, {pp * v} stages needs at least {need} "
            f"micro-batches per step but gradient accumulation gives "
            f"{n_microbatches}; raise train.global_batch or lower train.micro_batch"
        )
    if name in ("interleaved-1f1b", "interleaved-zb", "looped-bfs") and n_microbatches % pp:
        return (
            f"pp_schedule={name} needs micro-batches per step ({n_microbatches}) to "
            f"be a multiple of pp={pp}; adjust train.global_batch"
        )
    return None


@dataclass
class PartitionInputs:
    args: ModelArgs
    pp: int
    virtual_stages: int
    schedule: str
    seq_len: int
    micro_batch: int
    n_microbatches: int
    shard_degree: int = 1
    """dp_shard x tp: how many ways each stage's model states are split."""
    tp: int = 1
    full_recompute: bool = False


@dataclass
class Stage:
    index: int
    rank: int
    first_block: int
    num_blocks: int
    params: int
    flops_per_token: float
    memory_bytes: float

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.first_block + self.num_blocks)


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    if schedule in V_SCHEDULES:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def in_flight(rank: int, pp: int, n_microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations a rank holds at its peak: GPipe all of them; the 1F1B
    family at most pp - rank (the warm-up depth of that rank)."""
    if schedule == "gpipe":
        return n_microbatches
    return min(n_microbatches, pp - rank)


def _costs(x: PartitionInputs):
    """Per-block and end costs: (block_flops, block_bytes_per_inflight, block_state_bytes,
    embed_flops, embed_bytes, head_flops, head_bytes, head_act_bytes)."""
    a = x.args
    bp = block_param_count(a)
    state = 16 / x.shard_degree  # fp32 weight + grad + AdamW exp_avg, exp_avg_sq, per parameter
    block_flops = 6 * (bp - 2 * a.dim) + 12 * a.dim * x.seq_len
    tokens = x.micro_batch * x.seq_len
    # Activations per block per micro-batch (Korthikanti et al. 2022, 16-bit, SDPA-style
    # attention so the a·s²·5 score term is not stored), split by sequence/tensor parallelism.
    act = (2 * tokens * a.dim if x.full_recompute else 34 * tokens * a.dim) / x.tp
    emb_params = a.vocab_size * a.dim
    embed_flops = 2 * a.dim  # gather forward, scatter-add backward: negligible but counted
    head_flops = 6 * a.vocab_size * a.dim + 4 * a.vocab_size  # matmuls + softmax/CE
    head_act = tokens * a.vocab_size * 4 / x.tp  # fp32 logits for the loss
    return (
        block_flops,
        act,
        bp * state,
        embed_flops,
        emb_params * state,
        head_flops,
        emb_params * state,
        head_act,
    )


def partition(
    x: PartitionInputs, memory_weight: float = 0.0, explicit: list[int] | None = None
) -> list[Stage]:
    """Split x.args.n_layers blocks into pp x virtual_stages stages (see module docstring)."""
    num_stages = x.pp * x.virtual_stages
    n = x.args.n_layers
    if num_stages > n:
        raise UserError(
            f"pp x virtual stages = {x.pp} x {x.virtual_stages} = {num_stages} stages "
            f"but the model has {n} blocks: every stage needs at least one block; "
            f"lower parallel.pp or parallel.pp_virtual_stages"
        )
    if not 0.0 <= memory_weight <= 1.0:
        raise UserError(
            f"parallel.pp_memory_weight={memory_weight} must lie in [0, 1] "
            "(0 = balance compute, 1 = balance memory)"
        )
    bf, bact, bstate, ef, eb, hf, hb, hact = _costs(x)

    def stage_cost(s: int, count: int) -> tuple[float, float]:
        r = stage_rank(s, x.pp, x.schedule)
        k = in_flight(r, x.pp, x.n_microbatches, x.schedule)
        flops = count * bf + (ef if s == 0 else 0) + (hf if s == num_stages - 1 else 0)
        mem = (
            count * (bstate + k * bact)
            + (eb if s == 0 else 0)
            + ((hb if not x.args.tie_embeddings else 0) + k * hact if s == num_stages - 1 else 0)
        )
        return flops, mem

    if explicit is not None:
        counts = _check_explicit(explicit, num_stages, n)
    else:
        total_f = sum(stage_cost(s, 0)[0] for s in (0, num_stages - 1)) + n * bf
        total_m = sum(stage_cost(s, n // num_stages)[1] for s in range(num_stages))

        def blended(s: int, count: int) -> float:
            f, m = stage_cost(s, count)
            return (1 - memory_weight) * f / total_f + memory_weight * m / total_m

        counts = _min_max_split(n, num_stages, blended)
    stages, first = [], 0
    for s, c in enumerate(counts):
        f, m = stage_cost(s, c)
        params = c * block_param_count(x.args) + (x.args.vocab_size * x.args.dim if s == 0 else 0)
        if s == num_stages - 1:
            params += x.args.dim + (0 if x.args.tie_embeddings else x.args.vocab_size * x.args.dim)
        stages.append(Stage(s, stage_rank(s, x.pp, x.schedule), first, c, params, f, m))
        first += c
    return stages


def _check_explicit(counts: list[int], num_stages: int, n: int) -> list[int]:
    if len(counts) != num_stages:
        raise UserError(
            f"parallel.pp_layers lists {len(counts)} stages but pp x virtual stages "
            f"= {num_stages}; give {num_stages} comma-separated block counts"
        )
    if any(c < 1 for c in counts):
        raise UserError(
            f"parallel.pp_layers={','.join(map(str, counts))} leaves a stage empty; "
            "every stage needs at least one block"
        )
    if sum(counts) != n:
        raise UserError(
            f"parallel.pp_layers={','.join(map(str, counts))} places {sum(counts)} "
            f"blocks but the model has {n}; the counts must add up to {n}"
        )
    return counts


def _min_max_split(n: int, num_stages: int, cost) -> list[int]:
    """Contiguous split of n blocks into num_stages non-empty runs minimizing the largest cost
    (on ties, the first split found: the earliest stages get the fewest blocks)."""
    inf = float("inf")
    # best[s][j]: minimal max-cost of stages 0..s covering blocks [0, j)
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    choice = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], cost(s, j - i))
                if v < best[s][j] - 1e-12:
                    best[s][j], choice[s][j] = v, i
    counts, j = [], n
    for s in range(num_stages - 1, 0, -1):
        i = choice[s][j]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def parse_layers(spec: str) -> list[int] | None:
    if not spec.strip():
        return None
    try:
        return [int(c) for c in spec.split(",")]
    except ValueError:
        raise UserError(
            f"parallel.pp_layers={spec!r} must be comma-separated block counts per "
            'stage, e.g. "5,5,6"'
        ) from None


def format_table(stages: list[Stage]) -> str:
    lines = [
        f"{'stage':>5} {'rank':>4} {'blocks':>10} {'params':>10} {'GFLOP/token':>12} "
        f"{'est. memory':>12}"
    ]
    for s in stages:
        blocks = f"{s.first_block}-{s.first_block + s.num_blocks - 1}"
        extra = ("+emb " if s.index == 0 else "") + ("+head" if s.index == len(stages) - 1 else "")
        lines.append(
            f"{s.index:>5} {s.rank:>4} {blocks:>10} {s.params / 1e6:>9.1f}M "
            f"{s.flops_per_token / 1e9:>12.3f} {s.memory_bytes / 2**30:>10.2f}GiB "
            f"{extra}"
        )
    return "\n".join(lines)
