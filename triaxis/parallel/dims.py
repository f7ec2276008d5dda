"""ParallelDims: the parallel degrees, validated, and the one named DeviceMesh built from them.

Rank order (row-major over the mesh axes, last axis fastest):

    pp  x  dp_replicate  x  dp_shard  x  cp  x  tp

`tp` is innermost, then context parallelism (`cp`), then the MiCS partition group (`dp_shard`):
all three sit on consecutive ranks, i.e. inside one node where NVLink carries their traffic,
heaviest first. tp all-gathers and reduce-scatters activations twice per block; cp passes every
layer's K/V around its ring (2 x T/cp x kv_dim per hop, overlapped with attention) forward and
again with their gradients in backward; dp_shard gathers parameters once per block. FSDP shards
over dp_shard x cp (cp ranks hold the same model and average their gradients), so cp next to
dp_shard makes that group contiguous too. Replicas (`dp_replicate`) span nodes and exchange
gradients once per optimizer step. Pipeline stages are outermost: their point-to-point
activations are the lightest traffic of all.
"""

from __future__ import annotations

from dataclasses import dataclass

from triaxis.errors import UserError

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_AXES = ("pp", "dp_replicate", "edp", "ep", "cp", "tp")
"""build_expert_mesh's axes: dp_shard = edp x ep (expert parallelism, triaxis.parallel.expert)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    fsdp_always: bool = False
    """Wrap with FSDP even with nothing to shard (dp = 1): to measure the wrapper's own cost."""
    cp: int = 1
    """Context-parallel degree: ranks that split every sequence (triaxis.parallel.context)."""
    ep: int = 1
    """Expert-parallel degree: the innermost ep ranks of dp_shard split each MoE block's experts
    (triaxis.parallel.expert); not a factor of the world size of its own."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"parallel.{name}={value} must be >= 1 (1 disables it)")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise UserError(
                f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 to fill "
                "the rest of the world"
            )
        others = self.dp_replicate * self.tp * self.pp * self.cp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise UserError(
                    f"world size {self.world_size} is not divisible by dp_replicate x tp x pp x "
                    f"cp = {self.dp_replicate} x {self.tp} x {self.pp} x {self.cp} = {others}; "
                    f"launch a multiple "
                    f"of {others} processes or pick degrees whose product divides "
                    f"{self.world_size}"
                )
            self.dp_shard = self.world_size // others
        product = others * self.dp_shard
        if product != self.world_size:
            hint = (
                f"set --parallel.dp_shard={self.world_size // others}"
                if self.world_size % others == 0
                else "set --parallel.dp_shard=-1"
            )
            raise UserError(
                f"parallel degrees pp x dp_replicate x dp_shard x cp x tp = {self.pp} x "
                f"{self.dp_replicate} x {self.dp_shard} x {self.cp} x {self.tp} = {product} "
                f"but the world "
                f"size is {self.world_size}; {hint} or launch {product} processes"
            )
        if self.ep > 1 and self.dp_shard % self.ep:
            ok = [d for d in _divisors(self.dp_shard) if d > 1] or "1 (more dp_shard ranks)"
            raise UserError(
                f"parallel.ep={self.ep} does not divide parallel.dp_shard={self.dp_shard} (the "
                f"experts are split over ep of the dp_shard ranks); choose ep in {ok}"
            )
        if self.ep > 1 and self.cp > 1:
            raise UserError(
                f"parallel.ep={self.ep} with parallel.cp={self.cp} is not supported yet; "
                "set --parallel.cp=1 or --parallel.ep=1"
            )

    # -- sizes -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def dp_size(self) -> int:
        """Model replicas that read different data: dp_replicate x dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def loss_ranks(self) -> int:
        """Ranks whose losses average into the step's: data-parallel ranks x cp shards."""
        return self.dp_size * self.cp

    @property
    def shard_size(self) -> int:
        """Ranks one FSDP partition group spans: dp_shard x cp."""
        return self.dp_shard * self.cp

    @property
    def fsdp_enabled(self) -> bool:
        # cp ranks hold the same model and must average their gradients: FSDP over cp too.
        return self.dp_size > 1 or self.cp > 1 or self.fsdp_always

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (row-major, last axis fastest). Plain integer
        arithmetic: `triaxis layout` imports no numpy."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        coords: list[int] = []
        for size in reversed(self.shape):
            rank, c = divmod(rank, size)
            coords.append(c)
        return dict(zip(AXES, reversed(coords)))

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    # -- checks against the model ------------------------------------------------------------
    def check_model(self, n_heads: int, n_kv_heads: int, n_layers: int) -> None:
        if n_heads % self.tp or n_kv_heads % self.tp:
            import math

            ok = _divisors(math.gcd(n_heads, n_kv_heads))
            raise UserError(
                f"parallel.tp={self.tp} does not divide the attention heads "
                f"(n_heads={n_heads}, n_kv_heads={n_kv_heads}); choose tp in {ok}"
            )
        if self.pp > n_layers:
            raise UserError(
                f"parallel.pp={self.pp} is larger than the {n_layers} transformer "
                f"blocks; choose pp <= {n_layers}"
            )

    # -- the mesh ----------------------------------------------------------------------------
    def build_mesh(self, device_type: str):
        """(world mesh with axes AXES, the flattened `dp` mesh).

        The `dp` mesh averages losses and token counts: the data-parallel ranks and, with cp,
        the cp ranks whose losses are each over their shard of the sequence. (Which slice of
        the global batch a rank reads is `dp_rank`, the same for every cp rank.)
        """
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=AXES)
        if self.cp > 1:
            mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # FSDP's partition group
            return mesh, mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp")
        return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")

    def build_expert_mesh(self, device_type: str):
        """The mesh of expert parallelism: dp_shard split into (edp, ep), ep innermost, so an ep
        group is ep consecutive dp_shard ranks (one node's fast links carry the all-to-all)
        and edp the ranks holding the same experts. Axes pp x dp_replicate x edp x ep x cp x
        tp; a rank's coordinates agree with build_mesh's. Collective: every rank calls it."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.cp, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_AXES)

    def describe(self) -> str:
        return " x ".join(f"{a}={s}" for a, s in zip(AXES, self.shape))


def layout_table(dims: ParallelDims, gpus_per_node: int = 0) -> list[dict[str, int]]:
    """One row per rank: its node (when gpus_per_node is given), local rank and coordinates."""
    rows = []
    for rank in range(dims.world_size):
        row = {"rank": rank}
        if gpus_per_node:
            row["node"], row["local"] = divmod(rank, gpus_per_node)
        row.update(dims.coords(rank))
        rows.append(row)
    return rows
