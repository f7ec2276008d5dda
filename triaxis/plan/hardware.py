"""Hardware and cluster profiles: loaded from data files, never hard-coded.

`data/hardware.toml` ships the known GPUs and instance types; `--hardware FILE` merges a user's
file over it (same name replaces, a new name adds), so figures measured on one's own cluster
(nccl-tests bus bandwidth, a GEMM benchmark) replace the nominal ones.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triaxis.errors import UserError, nearest
from triaxis.hardware import shipped_tables

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (the MFU denominator)."""
    memory_bytes: float
    """Device memory; 0 = read at run time (the cpu profile)."""
    hbm_bytes_per_s: float
    """Memory bandwidth: the roof of memory-bound kernels."""
    gemm_efficiency: float
    """Fraction of peak a very large GEMM reaches."""
    flash_attention_efficiency: float
    """Fraction of peak of the fused attention kernel."""
    default_cluster: str
    """The instance type assumed when only the GPU is named."""
    bf16: bool = True
    """False: fp32 compute (CPU): 4-byte activations and no bf16 working copies."""
    fp8_flops: float = 0.0
    """Dense FP8 tensor-core peak, FLOP/s; 0 = no FP8 matrix units (train.float8 refused)."""


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    gpu: str
    """The GPU profile of this instance type."""
    gpus_per_node: int
    nvlink_bytes_per_s: float
    """Bus bandwidth of a collective inside one node."""
    nvlink_latency_s: float
    network_bytes_per_s: float
    """Achievable bandwidth of the node's NICs together (line rate x efficiency)."""
    network_latency_s: float
    host_bytes_per_s: float
    """Host <-> GPU copy bandwidth per GPU (CPU offload)."""
    host_memory_bytes: float
    """Host memory per node; 0 = read at run time."""
    source: str = ""


@dataclass(frozen=True)
class Calibration:
    elementwise_traffic: float
    """Forward bytes moved by memory-bound kernels per byte of saved activation."""
    memory_usable_fraction: float
    memory_reserved_bytes: float
    collective_launch_s: float
    cpu_adam_params_per_s: float
    float8_rowwise_slowdown: float = 1.0
    """Row-wise scaled FP8 GEMM time over tensor-wise (the per-row scales in the epilogue)."""


@dataclass(frozen=True)
class Hardware:
    """One GPU type in one cluster type: what a cost estimate needs."""

    gpu: GpuSpec
    cluster: ClusterSpec
    calib: Calibration
    gpus_per_node: int
    """GPUs per node in this run (the cluster's, unless --gpus-per-node overrides it)."""

    @property
    def usable_memory_bytes(self) -> float:
        return (
            self.gpu.memory_bytes * self.calib.memory_usable_fraction
            - self.calib.memory_reserved_bytes
        )

    @property
    def network_bytes_per_s_per_gpu(self) -> float:
        return self.cluster.network_bytes_per_s / self.gpus_per_node

    def describe(self) -> str:
        c = self.cluster
        return (
            f"{self.gpu.name} ({self.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16, "
            f"{self.gpu.memory_bytes / GIB:.0f} GiB) on {c.name}: {self.gpus_per_node} per "
            f"node, NVLink {c.nvlink_bytes_per_s / 1e9:.0f} GB/s, network "
            f"{c.network_bytes_per_s / 1e9:.0f} GB/s per node"
        )


@dataclass
class Catalog:
    gpus: dict[str, GpuSpec]
    clusters: dict[str, ClusterSpec]
    calib: Calibration


def _read(path: Path | None) -> dict[str, Any]:
    if path is None:
        return shipped_tables()
    if not path.is_file():
        raise UserError(
            f"--hardware {path} does not exist; pass a TOML file with [gpu.NAME] "
            "and/or [cluster.NAME] tables (see triaxis/plan/data/hardware.toml)"
        )
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--hardware {path} is not valid TOML: {e}") from None


def _gpu(name: str, t: dict[str, Any]) -> GpuSpec:
    return GpuSpec(
        name=name,
        peak_flops=t["peak_tflops"] * 1e12,
        memory_bytes=t["memory_gib"] * GIB,
        hbm_bytes_per_s=t["hbm_gbps"] * 1e9,
        gemm_efficiency=t["gemm_efficiency"],
        flash_attention_efficiency=t["flash_attention_efficiency"],
        default_cluster=t.get("default_cluster", ""),
        bf16=t.get("bf16", True),
        fp8_flops=t.get("fp8_tflops", 0.0) * 1e12,
    )


def _cluster(name: str, t: dict[str, Any]) -> ClusterSpec:
    return ClusterSpec(
        name=name,
        gpu=t["gpu"],
        gpus_per_node=t["gpus_per_node"],
        nvlink_bytes_per_s=t["nvlink_busbw_gbps"] * 1e9,
        nvlink_latency_s=t["nvlink_latency_us"] * 1e-6,
        network_bytes_per_s=t["network_gbit"] / 8 * 1e9 * t["network_efficiency"],
        network_latency_s=t["network_latency_us"] * 1e-6,
        host_bytes_per_s=t["host_gbps"] * 1e9,
        host_memory_bytes=t["host_memory_gib"] * GIB,
        source=t.get("source", ""),
    )


def load_catalog(extra: str | Path | None = None) -> Catalog:
    """The shipped profiles, with the tables of `extra` merged over them."""
    data = _read(None)
    if extra:
        user = _read(Path(extra))
        for section in ("gpu", "cluster"):
            data.setdefault(section, {}).update(user.get(section, {}))
        data["calibration"].update(user.get("calibration", {}))
    where = f" in {extra}" if extra else ""
    try:
        gpus = {n: _gpu(n, t) for n, t in data["gpu"].items()}
        clusters = {n: _cluster(n, t) for n, t in data["cluster"].items()}
    except KeyError as e:
        raise UserError(
            f"hardware profile{where} lacks the field {e}; copy a complete table "
            "from triaxis/plan/data/hardware.toml"
        ) from None
    c = data["calibration"]
    calib = Calibration(
        c["elementwise_traffic"],
        c["memory_usable_fraction"],
        c["memory_reserved_gib"] * GIB,
        c["collective_launch_us"] * 1e-6,
        c["cpu_adam_params_per_s"],
        c["float8_rowwise_slowdown"],
    )
    return Catalog(gpus, clusters, calib)


def _unknown(kind: str, name: str, known: list[str]) -> UserError:
    hint = nearest(name, known)
    fix = f"did you mean {hint!r}? " if hint else ""
    return UserError(
        f"--{kind} {name!r} is unknown; known {kind}s: {', '.join(known)}. {fix}"
        f"Add your own with --hardware FILE ([{kind}.NAME] tables)"
    )


def resolve_hardware(
    catalog: Catalog, gpu: str | None, cluster: str | None, gpus_per_node: int | None = None
) -> Hardware:
    """GPU and cluster by name. Either may be omitted: the cluster implies its GPU, the GPU its
    default cluster. Naming both runs that GPU on that cluster's network (a what-if)."""
    if gpu is None and cluster is None:
        raise UserError(
            "name the hardware: --gpu (one of "
            f"{', '.join(catalog.gpus)}) and/or --cluster (one of "
            f"{', '.join(catalog.clusters)})"
        )
    if cluster is not None and cluster not in catalog.clusters:
        raise _unknown("cluster", cluster, list(catalog.clusters))
    if gpu is not None and gpu not in catalog.gpus:
        raise _unknown("gpu", gpu, list(catalog.gpus))
    if cluster is None:
        cluster = catalog.gpus[gpu].default_cluster  # type: ignore[index]
        if cluster not in catalog.clusters:
            raise UserError(
                f"gpu {gpu!r} names default_cluster {cluster!r}, which is not a "
                "known cluster; pass --cluster"
            )
    cl = catalog.clusters[cluster]
    g = catalog.gpus[gpu or cl.gpu]
    if g.memory_bytes == 0 or cl.host_memory_bytes == 0:
        g, cl = _fill_host_memory(g, cl, gpus_per_node or cl.gpus_per_node)
    gpn = gpus_per_node or cl.gpus_per_node
    if gpn < 1:
        raise UserError(f"--gpus-per-node={gpn} must be >= 1")
    return Hardware(g, cl, catalog.calib, gpn)


def _fill_host_memory(g: GpuSpec, cl: ClusterSpec, procs: int) -> tuple[GpuSpec, ClusterSpec]:
    """The cpu profile: memory is this machine's, split between the processes of one node."""
    import dataclasses

    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if g.memory_bytes == 0:
        g = dataclasses.replace(g, memory_bytes=host / max(procs, 1))
    if cl.host_memory_bytes == 0:
        cl = dataclasses.replace(cl, host_memory_bytes=host)
    return g, cl
