"""Compute time of one transformer block on one GPU: a roofline per kernel.

A GEMM of (m x k) @ (k x n) does 2mnk FLOPs and moves at least e(mk + kn + mn) bytes. Its time is
modelled as the sum of its compute time at the GPU's large-GEMM efficiency and its memory time at
HBM bandwidth:

    t = 2mnk / (peak x gemm_efficiency) + e(mk + kn + mn) / hbm_bandwidth

The sum (rather than the max of a strict roofline) is the honest smooth form: a tile loads its
operands and then multiplies, and the two overlap only partly. So the achievable fraction of peak
depends on the matrix sizes per GPU after the TP split: 1 / (1 + ridge / intensity), with
intensity 1 / (1/m + 1/n + 1/k) FLOP/byte (x 2/e) and ridge = peak x efficiency / bandwidth. A
block of h = 2304 on one A100 reaches ~93% of the large-GEMM rate; attention scores with head
dim 96 reach ~40%.

Everything that is not a GEMM (norms, activations, rotary, softmax, dropout, residual adds) is
memory-bound: it moves `elementwise_traffic` bytes per byte of activation it saves for backward
in forward, twice that in backward (calibration constant, one for all hardware).
"""

from __future__ import annotations

from dataclasses import dataclass

from triaxis.plan.hardware import Hardware
from triaxis.plan.layout import Runtime
from triaxis.plan.memory import layer_activation_bytes_per_token
from triaxis.plan.shape import ModelShape


def gemm_s(hw: Hardware, m: float, n: float, k: float, elem: int) -> float:
    g = hw.gpu
    return 2 * m * n * k / (g.peak_flops * g.gemm_efficiency) + \
        elem * (m * k + k * n + m * n) / g.hbm_bytes_per_s


@dataclass(frozen=True)
class BlockTime:
    """Seconds of one block for one micro-batch on one GPU."""

    fwd_s: float
    bwd_s: float


def block_time(shape: ModelShape, rt: Runtime, hw: Hardware, micro_batch: int, seq: int,
               tp: int, elem: int) -> BlockTime:
    t_tokens = micro_batch * seq
    h, kv, f = shape.dim, shape.kv_dim, shape.ffn_dim
    # Projections; backward runs two GEMMs of the same size per forward GEMM (data + weight).
    if rt.fused_qkv:
        gemms = [(h + 2 * kv) / tp]
    else:
        gemms = [h / tp, kv / tp, kv / tp]
    fwd = sum(gemm_s(hw, t_tokens, n, h, elem) for n in gemms)
    fwd += gemm_s(hw, t_tokens, h, h / tp, elem)  # output projection (row-wise)
    fwd += (shape.mlp_matrices - 1) * gemm_s(hw, t_tokens, f / tp, h, elem)
    fwd += gemm_s(hw, t_tokens, h, f / tp, elem)
    bwd = 2 * fwd
    # Attention core: scores and weighted values, 4·b·s²·h/tp FLOPs forward.
    heads = shape.n_heads / tp
    if rt.flash_attention:
        # Causal flash kernels skip the masked half; backward does 2.5x the forward's work.
        flops = 4 * micro_batch * seq * seq * h / tp / 2
        t_attn = flops / (hw.gpu.peak_flops * hw.gpu.flash_attention_efficiency)
        fwd, bwd = fwd + t_attn, bwd + 2.5 * t_attn
    else:
        batch = micro_batch * heads
        t_attn = batch * (gemm_s(hw, seq, seq, shape.head_dim, elem) +
                          gemm_s(hw, seq, shape.head_dim, seq, elem))
        fwd, bwd = fwd + t_attn, bwd + 2 * t_attn
    act = layer_activation_bytes_per_token(shape, rt, seq, tp, elem) * t_tokens
    t_elem = hw.calib.elementwise_traffic * act / hw.gpu.hbm_bytes_per_s
    return BlockTime(fwd + t_elem, bwd + 2 * t_elem)


def head_time(shape: ModelShape, hw: Hardware, micro_batch: int, seq: int, tp: int,
              elem: int) -> BlockTime:
    """LM head GEMM (vocabulary split by tp) and the cross-entropy over its logits."""
    t_tokens = micro_batch * seq
    fwd = gemm_s(hw, t_tokens, shape.vocab_size / tp, shape.dim, elem)
    logits = t_tokens * shape.vocab_size / tp * (elem + 4)
    t_loss = hw.calib.elementwise_traffic * logits / hw.gpu.hbm_bytes_per_s
    return BlockTime(fwd + t_loss, 2 * fwd + 2 * t_loss)


def optimizer_s(hw: Hardware, params_per_gpu: float, offloaded: bool) -> float:
    """AdamW + gradient-norm clipping: memory-bound, ~32 bytes per fp32 parameter (read param,
    grad twice, both moments; write param and moments). On the host when offloaded."""
    if offloaded:
        return params_per_gpu / hw.calib.cpu_adam_params_per_s
    return 32 * params_per_gpu / hw.gpu.hbm_bytes_per_s
