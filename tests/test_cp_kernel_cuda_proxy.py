"""The fused CUDA kernels of ring attention, proven on CPU (no GPU here).

(a) `select_kernel`'s choice for each (device type, dtype, mask kind, head_dim) case.
(b) The argument plumbing: the CUDA branch runs on CPU tensors with the four aten ops replaced
    by reference implementations. Each fake binds its arguments against the real op's schema,
    calls the real op on meta copies of them (the dispatcher itself rejects a wrong count, name
    or type; the Meta kernel gives the output shapes the fake must match), asserts what the CUDA
    kernels require (bias dtype and alignment, the lse padding, dropout 0, grad_input_mask) and
    computes the true attention / gradient from the arguments it was given (the efficient
    forward returns its lse padded to 32 rows with +inf, as on CUDA). Ring attention through
    that branch must equal dense SDPA (1e-5, fp32) forward and backward on multi-document rows.
(c) The wrappers of triaxis.parallel.cp_kernel_cuda on meta tensors: output shapes and dtypes
    from torch's own Meta kernels (run under every torch the suite runs on: 2.11 and 2.13).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.tensor  # noqa: F401 - its sharding rules read the real ops: load them first

from tests.dist import run_workers
from tests.test_ring_attention import (
    CHUNK,
    _check,
    check_one_rank_ring_equals_dense,
)
from triaxis.parallel import cp_kernel, cp_kernel_cuda

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# (a) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "dtype", "mask", "head_dim", "sm", "name", "reason"),
    [
        ("cpu", BF16, "bias", 64, None, "cpu", "CPU"),
        ("cpu", F32, "causal", 7, None, "cpu", "CPU"),
        ("cuda", BF16, "none", 64, 90, "flash", "head_dim 64"),
        ("cuda", F16, "causal", 128, 80, "flash", "causal"),
        ("cuda", BF16, "causal", 256, None, "flash", ""),
        ("cuda", BF16, "bias", 64, 90, "efficient", "flash refuses a document mask"),
        ("cuda", F32, "bias", 64, 90, "efficient", "flash refuses a document mask"),
        ("cuda", F32, "causal", 64, 90, "efficient", "torch.float32 (it needs float16"),
        ("cuda", F32, "none", 4, 90, "efficient", "torch.float32"),
        ("cuda", BF16, "none", 288, 90, "efficient", "head_dim 288 (it needs a multiple of 8"),
        ("cuda", F16, "causal", 64, 75, "efficient", "sm75 (it needs sm80"),
        ("cuda", BF16, "causal", 64, 75, "math", "bfloat16 on sm75"),
        ("cuda", BF16, "none", 60, 90, "math", "efficient refuses head_dim 60"),
        ("cuda", F32, "bias", 6, 90, "math", "multiple of 4 in torch.float32"),
        ("cuda", F64, "causal", 64, 90, "math", "efficient refuses torch.float64"),
        ("mps", F16, "none", 64, None, "math", "mps: no fused kernel"),
    ],
)
def test_select_kernel(device, dtype, mask, head_dim, sm, name, reason):
    choice = cp_kernel.select_kernel(device, dtype, mask, head_dim, sm)
    assert choice.name == name and reason in choice.reason, choice


def test_choose_reads_the_block_and_a_patched_family_still_wins(monkeypatch):
    q = torch.zeros(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert cp_kernel.choose(q, None, True).name == "cpu"
    monkeypatch.setattr(cp_kernel, "kernel_name", lambda device: "cuda")
    assert [cp_kernel.choose(q, m, c).name for m, c in ((None, True), (mask, False))] == [
        "efficient",  # fp32: flash refuses
        "efficient",
    ]
    with pytest.warns(UserWarning, match="math kernel on CUDA: flash refuses torch.float64"):
        assert cp_kernel.choose(q.double(), None, False).name == "math"
    monkeypatch.setattr(cp_kernel, "kernel_name", lambda device: "math")
    assert cp_kernel.choose(q, mask, False).name == "math"


# (b) ------------------------------------------------------------------------------------------

OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
)
REAL = {name: getattr(torch.ops.aten, name).default for name in OPS}


def _accepts(arg_type, value) -> bool:
    kind = arg_type.kind()
    if kind == "OptionalType":
        return value is None or _accepts(arg_type.getElementType(), value)
    if kind == "TensorType":  # None: an undefined tensor, as torch's own autograd passes
        return value is None or isinstance(value, torch.Tensor)
    if kind == "FloatType":
        return isinstance(value, float)
    if kind == "BoolType":
        return isinstance(value, bool)
    if kind in ("IntType", "SymIntType"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "ListType":
        return isinstance(value, (list, tuple)) and all(
            _accepts(arg_type.getElementType(), x) for x in value
        )
    raise AssertionError(f"no rule for {arg_type}")


def bind(schema, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, bound as the schema says: positional ones in order,
    keyword-only ones by name, defaults for the rest; each value of the schema's type."""
    positional = [a for a in schema.arguments if not a.kwarg_only]
    assert len(args) <= len(positional), f"{schema.name}: {len(args)} positional arguments"
    bound = {a.name: value for a, value in zip(positional, args)}
    for name, value in kwargs.items():
        assert name in {a.name for a in schema.arguments} - bound.keys(), f"{schema.name}: {name}"
        bound[name] = value
    for a in schema.arguments:
        if a.name not in bound:
            assert a.has_default_value(), f"{schema.name}: {a.name} missing"
            bound[a.name] = a.default_value
        assert _accepts(a.type, bound[a.name]), f"{schema.name}: {a.name}={bound[a.name]!r}"
        if a.N is not None:
            assert len(bound[a.name]) == a.N, f"{schema.name}: {a.name} needs {a.N} values"
    return bound


def _meta(x):
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    return [_meta(y) for y in x] if isinstance(x, list) else x


class FakeOp:
    """An aten op replaced by `impl(bound args)`, checked against the real op's schema and Meta
    kernel. `.default` is itself, so `torch.ops.aten.X.default(...)` lands here."""

    def __init__(self, name: str, impl):
        self.real, self.impl, self.calls = REAL[name], impl, 0

    @property
    def default(self):
        return self

    def __call__(self, *args, **kwargs):
        bound = bind(self.real._schema, args, kwargs)
        want = self.real(*map(_meta, args), **{k: _meta(v) for k, v in kwargs.items()})
        got = self.impl(bound)
        assert len(got) == len(want), self.real._schema.name
        for g, w in zip(got, want):
            if isinstance(w, torch.Tensor):
                assert (g.shape, g.dtype) == (w.shape, w.dtype), (self.real, g.shape, w.shape)
            else:
                assert g == w, (self.real, g, w)
        self.calls += 1
        return got


def _attention(q, k, bias, causal):
    """(B, H, Lq, Lk) fp64 scores with the additive bias and the top-left causal mask."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    return scores


def _grads(a, lse, bias):
    """(dq, dk, dv) from the given merged out and lse: P = exp(S - lse), dS = P (dP - delta)."""
    q, k, v, dout = a["query"], a["key"], a["value"], a.get("grad_out", a.get("grad_out_"))
    probs = torch.exp(_attention(q, k, bias, a["is_causal"]) - lse.double()[..., None])
    dp = dout.double() @ v.double().transpose(-1, -2)
    delta = (dout.double() * a["out"].double()).sum(-1, keepdim=True)
    ds = probs * (dp - delta) / math.sqrt(q.shape[-1])
    dv = probs.transpose(-1, -2) @ dout.double()
    grads = (ds @ k.double(), ds.transpose(-1, -2) @ q.double(), dv)
    return tuple(g.to(q.dtype) for g in grads)


def _common(a):
    assert a["dropout_p"] == 0.0 and a["scale"] is None
    for name in ("query", "key", "value"):
        assert a[name].stride(-1) == 1, f"{name}: the kernels need a contiguous last dim"


def _check_bias(bias, q, k):
    if bias is not None:  # what the CUDA efficient kernel checks or needs
        assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert bias.dtype == q.dtype and bias.stride(-1) == 1
        assert bias.stride(-2) % cp_kernel_cuda.BIAS_ALIGN == 0, bias.stride()


def flash(a):
    _common(a)
    assert a["return_debug_mask"] is False
    q, v = a["query"], a["value"]
    scores = _attention(q, a["key"], None, a["is_causal"])
    lse = torch.logsumexp(scores, -1)
    out = (torch.softmax(scores, -1) @ v.double()).to(q.dtype)
    rng = (torch.empty(2, dtype=torch.uint64), torch.empty((), dtype=torch.uint64))
    empty = torch.empty(0, dtype=q.dtype)
    return out, lse.float(), None, None, q.shape[2], a["key"].shape[2], *rng, empty


def flash_backward(a):
    _common(a)
    assert a["cum_seq_q"] is None and a["cum_seq_k"] is None  # a dense batch
    assert (a["max_q"], a["max_k"]) == (a["query"].shape[2], a["key"].shape[2])
    assert a["logsumexp"].shape == a["query"].shape[:3] and a["logsumexp"].dtype == F32
    assert a["philox_seed"].dtype == torch.uint64 == a["philox_offset"].dtype
    return _grads(a, a["logsumexp"], None)


def efficient(a):
    _common(a)
    q, k, bias = a["query"], a["key"], a["attn_bias"]
    assert a["compute_log_sumexp"] is True
    _check_bias(bias, q, k)
    scores = _attention(q, k, bias, a["is_causal"])
    lse = torch.logsumexp(scores, -1)  # -inf on a row with no visible key
    out = (torch.softmax(scores, -1) @ a["value"].double()).to(q.dtype)  # NaN on such a row
    pad = -q.shape[2] % 32  # as CUDA returns it: padded with +inf to a multiple of 32
    lse = torch.cat([lse, lse.new_full((*lse.shape[:2], pad), math.inf)], -1)
    seed = torch.empty((), dtype=torch.long)
    return out, lse.float(), seed, seed.clone()


def efficient_backward(a):
    _common(a)
    q, k, bias, lse = a["query"], a["key"], a["attn_bias"], a["logsumexp"]
    _check_bias(bias, q, k)
    assert list(a["grad_input_mask"]) == [True, True, True, False]
    Lq = q.shape[2]
    assert lse.dtype == F32 and lse.shape == (*q.shape[:2], math.ceil(Lq / 32) * 32)
    assert bool((lse[..., Lq:] == math.inf).all()) and lse.is_contiguous()
    return (*_grads(a, lse[..., :Lq], bias), None)


IMPLS = dict(zip(OPS, (flash, flash_backward, efficient, efficient_backward)))


@pytest.fixture
def cuda_branch(monkeypatch):
    """Every block takes the CUDA branch, the aten ops faked. pretend: the dtype the selection
    sees (bf16: flash for unmasked blocks; the tensors stay fp32 so 1e-5 parity holds)."""
    fakes = {name: FakeOp(name, impl) for name, impl in IMPLS.items()}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.ops.aten, name, fake)
    monkeypatch.setattr(cp_kernel, "kernel_name", lambda device: "cuda")
    real_select = cp_kernel.select_kernel

    def pretend(dtype):
        select = lambda device, _dtype, *rest: real_select(device, dtype, *rest)  # noqa: E731
        monkeypatch.setattr(cp_kernel, "select_kernel", select)

    return fakes, pretend


@pytest.mark.parametrize("pretend_dtype", [BF16, F32])
def test_cuda_branch_one_rank_equals_dense(cuda_branch, pretend_dtype):
    """cp=1 (the blocks, merge and backward without communication): with bf16's choice the
    unmasked and causal-diagonal blocks run flash and the document-masked ones efficient; with
    fp32's every block runs efficient (is_causal on the diagonal). Rows include a chunk length
    (10) that is not a multiple of 32, and blocks whose rows see no key."""
    fakes, pretend = cuda_branch
    pretend(pretend_dtype)
    check_one_rank_ring_equals_dense()
    calls = {name: fake.calls for name, fake in fakes.items()}
    flash_calls = 3 if pretend_dtype == BF16 else 0  # the plain causal plan: 3 blocks
    assert calls[OPS[0]] == calls[OPS[1]] >= flash_calls
    assert calls[OPS[2]] == calls[OPS[3]] > 0  # document-masked blocks
    assert sum(calls.values()) == 2 * 6  # 3 blocks per plan, 2 plans, forward + backward


def _ring_worker(rank, cp, seq_len):
    from tests.test_ring_attention import _ring_worker as worker

    return worker(rank, cp, seq_len, True)


def test_cuda_branch_ring_of_two_equals_dense(cuda_branch):
    """cp=2 with documents crossing the shard boundaries, forked workers inheriting the fakes:
    K/V blocks go round the ring and meet the fused kernels' plumbing."""
    _, pretend = cuda_branch
    pretend(BF16)
    seq_len = 4 * CHUNK
    _check(run_workers(_ring_worker, 2, seq_len), seq_len, masked=True)


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize(("lq", "lk"), [(40, 40), (64, 48)])
def test_wrappers_on_meta_tensors(dtype, lq, lk):
    """torch's Meta kernels take the wrappers' exact calls and give back what the ring needs:
    out like q, lse (B, H, Lq) fp32 (the efficient one sliced from 64 rows at Lq = 40), grads
    like q/k/v."""
    B, H, D = 2, 3, 16
    q = torch.empty(B, H, lq, D, dtype=dtype, device="meta")
    k, v = (torch.empty(B, H, lk, D, dtype=dtype, device="meta") for _ in range(2))
    mask = torch.ones(B, 1, lq, lk, dtype=torch.bool, device="meta")
    lse_fp32 = torch.empty(B, H, lq, device="meta")
    for name, fwd, bwd in (
        ("flash", lambda: cp_kernel_cuda.flash_forward(q, k, v, lq == lk),
         lambda out, lse: cp_kernel_cuda.flash_backward(q, q, k, v, out, lse, lq == lk)),
        ("efficient", lambda: cp_kernel_cuda.efficient_forward(q, k, v, mask, False),
         lambda out, lse: cp_kernel_cuda.efficient_backward(q, q, k, v, out, lse, mask, False)),
    ):  # fmt: skip
        out, lse = fwd()
        assert (out.shape, out.dtype) == (q.shape, dtype), name
        assert (lse.shape, lse.dtype) == (lse_fp32.shape, F32), name
        grads = bwd(out, lse)
        assert [(g.shape, g.dtype) for g in grads] == [(t.shape, dtype) for t in (q, k, v)], name


def test_efficient_bias_rows_are_aligned_and_broadcast_over_heads():
    q = torch.zeros(2, 4, 5, 8, dtype=BF16)
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    bias = cp_kernel_cuda.efficient_bias(mask, q)
    assert bias.shape == (2, 4, 5, 7) and bias.dtype == BF16
    assert bias.stride()[1:] == (0, 16, 1)  # rows of 7 stored 16 apart; heads share one copy
    assert torch.equal(bias[:, 1] == 0, mask[:, 0]) and torch.isinf(bias[:, 2][~mask[:, 0]]).all()
    assert cp_kernel_cuda.efficient_bias(None, q) is None
