"""Document masking: a packed window computes each of its documents exactly as if it ran alone.

The reference of every parity check is the plain model (no masking) run on each document by
itself, positions from 0: the packed window's summed loss and its gradients must equal the sums
over its documents, in one process and under FSDP (dp_shard=2) and tensor parallelism (tp=2).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from tests.test_model import build
from triaxis.model import PRESETS, Transformer, flops_per_token
from triaxis.model.attention import (
    attend,
    attention_backend,
    document_ids,
    document_mask,
    document_positions,
)
from triaxis.model.llama import clean_name

EOS = 7
# Two rows of 32 inputs (+1 target). Row 0: documents of 6, 10 and 16 tokens (the last one cut
# by the window's end); row 1: 12 tokens continuing an earlier document, then 20 ending in EOS.
# Even lengths, so tensor parallelism's sequence sharding splits each one evenly.
LENGTHS = [[6, 10, 16], [12, 20]]


def packed_window(vocab: int, seed: int = 0) -> torch.Tensor:
    """(2, 33) tokens whose documents end with EOS at the LENGTHS boundaries (no other EOS)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(EOS + 1, vocab, (2, 33), generator=g)
    for row, lengths in enumerate(LENGTHS):
        end = 0
        for n in lengths:
            end += n
            if end <= 32:
                tokens[row, end - 1] = EOS
    return tokens


def summed_loss(model, inputs, targets, doc_ids=None) -> torch.Tensor:
    logits = model(inputs, doc_ids=doc_ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (gathered from DTensor shards: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[clean_name(name)] = g.detach().clone()
    return out


def packed_and_alone(model, tokens) -> tuple[tuple, tuple]:
    """((loss, grads) of the packed window with document masking, (the sums) over each
    document run alone through the plain causal model)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.zero_grad(set_to_none=True)
    packed = summed_loss(model, inputs, targets, document_ids(inputs, EOS))
    packed.backward()
    packed_grads = full_grads(model)
    model.zero_grad(set_to_none=True)
    alone = torch.zeros(())
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            s = slice(start, start + n)
            loss = summed_loss(model, inputs[row : row + 1, s], targets[row : row + 1, s])
            loss.backward()  # gradients add up over the documents
            alone += loss.detach()
            start += n
    return (packed.detach(), packed_grads), (alone, full_grads(model))


def assert_parity(packed, alone) -> None:
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=1e-5)
    assert packed[1].keys() == alone[1].keys()
    for name, g in alone[1].items():
        torch.testing.assert_close(packed[1][name], g, rtol=1e-5, atol=1e-5, msg=name)


# -- pieces ---------------------------------------------------------------------------------


def test_document_ids_and_positions_restart_after_each_eos():
    tokens = torch.tensor([[3, 7, 4, 5, 7, 7, 6], [1, 2, 3, 4, 5, 6, 7]])
    ids = document_ids(tokens, 7)
    # The EOS closes its own document; the token after it starts the next.
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]]
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6]]


def test_backend_is_picked_by_device():
    assert attention_backend("cpu") == "sdpa"
    assert attention_backend(torch.device("cuda", 0)) == "flex"
    mask = document_mask(document_ids(torch.tensor([[1, 7, 2, 3]]), 7))
    # sdpa's mask: (B, 1, T, T) block-diagonal causal, True = attend.
    assert (
        mask.tolist() == [[[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]]]
        and mask.dtype == torch.bool
    )


def test_flex_mask_computes_what_the_sdpa_mask_computes():
    """The CUDA path's mask_mod against the CPU path's dense mask, forward on CPU (FlexAttention
    has a CPU forward, not a backward): the one switch gives the same attention."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 16, generator=g) for h in (4, 2, 2))
    ids = document_ids(packed_window(100)[:, :-1], EOS)
    sdpa = attend(q, k, v, document_mask(ids, "sdpa"), gqa=True)
    with pytest.warns(UserWarning, match="without torch.compile"):  # eager is fine for a check
        flex = flex_attention(q, k, v, block_mask=document_mask(ids, "flex"), enable_gqa=True)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-6)


# -- parity: packed window = its documents alone --------------------------------------------


def test_packed_window_equals_its_documents_alone():
    model = build()
    packed, alone = packed_and_alone(model, packed_window(model.args.vocab_size))
    assert_parity(packed, alone)
    # Without the mask the window is one sequence: the documents see each other.
    inputs, targets = packed_window(model.args.vocab_size)[:, :-1], packed_window(512)[:, 1:]
    with torch.no_grad():
        plain = summed_loss(model, inputs, targets)
    assert abs(float(plain) - float(alone[0])) > 1e-3


def test_window_without_eos_is_exactly_the_unmasked_model():
    model = build()
    tokens = torch.randint(EOS + 1, model.args.vocab_size, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = []
    for doc_ids in (None, document_ids(inputs, EOS)):
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, inputs, targets, doc_ids)
        loss.backward()
        results.append((loss.detach(), full_grads(model)))
    (plain, plain_grads), (masked, masked_grads) = results
    assert torch.equal(plain, masked)
    for name, g in plain_grads.items():
        assert torch.equal(g, masked_grads[name]), name


def _parallel_parity(rank: int, world: int, degrees: dict) -> tuple:
    from triaxis.parallel.dims import ParallelDims
    from triaxis.parallel.parallelize import parallelize

    cfg = make_config("synthetic", "unused", **degrees)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world, p.fsdp_always)
    mesh, _ = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(PRESETS["tiny"])
    parallelize(model, dims, mesh, p, cfg.train, torch.device("cpu"), None)
    model.materialize("cpu")
    model.init_weights(seed=0)
    # Every rank feeds the same window: FSDP's averaged gradients are then the window's own.
    return packed_and_alone(model, packed_window(model.args.vocab_size))


@pytest.mark.parametrize(
    "degrees",
    [{"parallel__dp_shard": 2}, {"parallel__tp": 2, "parallel__dp_shard": 1}],
    ids=["dp_shard2", "tp2"],
)
def test_packed_window_equals_documents_alone_in_parallel(degrees):
    got = run_workers(_parallel_parity, 2, degrees)
    reference = packed_and_alone(build(), packed_window(PRESETS["tiny"].vocab_size))
    for packed, alone in got:
        assert_parity(packed, alone)
        assert_parity(packed, reference[1])  # and the same numbers as one process


# -- the trainer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> str:
    """Byte-tokenized documents of 1 to 4 words: several EOS in every 32-token window."""
    from triaxis.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("short_docs")
    g = torch.Generator().manual_seed(0)
    words = "the of a data model token window train mask shard rank loss step".split()
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(3000):
            n = int(torch.randint(1, 5, (1,), generator=g))
            idx = torch.randint(0, len(words), (n,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    out = root / "data"
    prepare(
        PrepareOptions(inputs=[str(root / "docs.jsonl")], output=str(out), tokenizer="byte"),
        log=lambda *_: None,
    )
    return str(out)


def test_trainer_loss_is_the_documents_alone(short_docs, tmp_path):
    """The trainer derives document ids from the data's own EOS: its loss of a batch (the mean
    over tokens) is the per-document reference, and differs from the unmasked loss."""
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(
        short_docs,
        str(tmp_path),
        data__document_mask="true",
        data__mean_document_tokens=8,
        train__micro_batch=4,
    )
    trainer = Trainer(cfg, init_distributed("cpu"))
    # MFU counts 8 keys per query, not the 32-token window.
    assert trainer.flops_per_token == flops_per_token(trainer.model_args, 8)
    eos = trainer.train_ds.manifest["tokenizer"]["eos_id"]
    inputs, targets = trainer.local_batch(trainer.train_ds, 0, 0)
    assert int((inputs == eos).sum()) >= 8  # several documents per window (4 rows)
    with torch.no_grad():
        masked = float(trainer.loss_of(inputs, targets))
        reference = 0.0
        for row in range(inputs.shape[0]):
            ends = (inputs[row] == eos).nonzero().flatten().tolist()
            for s, e in zip([0] + [i + 1 for i in ends], ends + [inputs.shape[1] - 1]):
                if s <= e:
                    reference += float(
                        summed_loss(
                            trainer.model,
                            inputs[row : row + 1, s : e + 1],
                            targets[row : row + 1, s : e + 1],
                        )
                    )
        trainer.eos_id = None
        unmasked = float(trainer.loss_of(inputs, targets))
    # At initialization the model is near uniform, so masking moves the loss only ~1e-4
    # (relative): the match is held ten times tighter than that gap.
    assert masked == pytest.approx(reference / targets.numel(), rel=2e-6)
    assert masked != pytest.approx(unmasked, rel=2e-5)


TRAIN_LAYOUTS = {
    # With the block wrappers too: per-block compile and checkpointing see the mask argument.
    # (tp + full checkpointing + compile fails in this PyTorch with or without masking: a
    # DeviceMesh among the tensors saved for backward.)
    "dp_shard2_compile": {
        "parallel__dp_shard": 2,
        "train__micro_batch": 2,
        "train__compile": "true",
        "train__compile_backend": "aot_eager",
    },
    "tp2_ac": {
        "parallel__tp": 2,
        "parallel__dp_shard": 1,
        "train__micro_batch": 4,
        "parallel__activation_checkpoint": "full",
    },
    "pp2": {
        "parallel__pp": 2,
        "parallel__dp_shard": 1,
        "model__tie_embeddings": "false",
        "train__micro_batch": 4,
        "train__val_every": 5,  # the pipeline's forward-only walk carries the documents too
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_masked_training_matches_single_process(layout, short_docs, tmp_path):
    """Training with document masking under each parallel axis repeats the one-process run
    (pipelining: every stage derives the document ids from the batch it holds)."""
    degrees = {**TRAIN_LAYOUTS[layout], "data__document_mask": "true"}
    got = run_workers(train_collect, 2, short_docs, str(tmp_path / "got"), degrees, timeout_s=240)
    extra = {k: v for k, v in degrees.items() if k.startswith(("model", "data", "train__val"))}
    ref = train_collect(0, 1, short_docs, str(tmp_path / "ref"), {"train__micro_batch": 4, **extra})
    # With pipelining each pipeline rank reports the parameters of its own stages.
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    assert_same_run(merged, ref)
    assert bool(ref["val_losses"]) == ("train__val_every" in degrees)
    for step, val in ref["val_losses"].items():
        assert got[0]["val_losses"][step] == pytest.approx(val, rel=1e-5)
    unmasked = train_collect(0, 1, short_docs, str(tmp_path / "plain"), {"train__micro_batch": 4})
    assert unmasked["losses"][5] != pytest.approx(ref["losses"][5], rel=1e-4)


# -- FLOPs: the planner and MFU count the keys each query really attends --------------------


def test_planner_counts_masked_attention_flops():
    from triaxis.config import attention_span
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Layout, Problem, load_model
    from triaxis.plan.runtimes import RUNTIMES
    from triaxis.plan.search import evaluate

    shape, _ = load_model("8b")
    hw = resolve_hardware(load_catalog(), "h100", "p5")
    layout = Layout(1, 8, 1, 1, 1, "none")
    whole = Problem(shape, hw, RUNTIMES["triaxis"], 8192, 64)
    docs = Problem(shape, hw, RUNTIMES["triaxis"], 8192, 64, attention_span=1024)
    a, b = evaluate(whole, layout), evaluate(docs, layout)
    # Attention is 12·layers·dim·keys per token: 8x fewer keys, the same tokens.
    flops_ratio = flops_per_token(shape, 1024) / flops_per_token(shape, 8192)
    step_ratio = b.time.total / a.time.total
    assert b.tokens_per_s * b.time.total == pytest.approx(a.tokens_per_s * a.time.total)
    assert b.mfu / a.mfu == pytest.approx(flops_ratio / step_ratio, rel=1e-9)
    assert step_ratio < 0.95  # the flash kernel skips the blocks outside the documents
    # A span over the window counts the window; the knob reaches the planner from the config.
    longer = Problem(shape, hw, RUNTIMES["triaxis"], 8192, 64, attention_span=100_000)
    assert evaluate(longer, layout).time.total == a.time.total
    cfg = make_config("synthetic", "unused", data__document_mask="true")
    assert attention_span(cfg.data) == 32  # unknown document length: the window
    cfg.data.mean_document_tokens = 8
    assert attention_span(cfg.data) == 8
    cfg.data.document_mask = False
    assert attention_span(cfg.data) == 32


def test_plan_command_takes_the_document_length(capsys):
    from triaxis.plan.cli import main

    rates = []
    for doc in ("0", "512"):
        argv = [
            "--model",
            "8b",
            "--gpus",
            "8",
            "--gpu",
            "h100",
            "--seq",
            "8192",
            "--global-batch",
            "64",
        ]
        assert main([*argv, "--doc-tokens", doc, "--json", "--top", "1"]) == 0
        rates.append(json.loads(capsys.readouterr().out)["plans"][0]["tokens_per_s"])
    assert rates[1] > 1.05 * rates[0]  # shorter documents: less attention work per token
    assert main([*argv, "--doc-tokens", "-1"]) == 2
    assert "--doc-tokens=-1 must be >= 0" in capsys.readouterr().err
