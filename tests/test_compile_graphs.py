"""train.compile really compiles, in every activation-checkpointing mode, with and without
activation offload: counted Dynamo graphs and graph breaks through the trainer's own
`parallelize`, not only equal values (an eager fallback computes the same numbers)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from triaxis.config.rules import validate
from triaxis.config.sections import Config, ParallelConfig, TrainConfig
from triaxis.errors import UserError
from triaxis.model.llama import Transformer, clean_name
from triaxis.model.presets import PRESETS
from triaxis.parallel.dims import ParallelDims
from triaxis.parallel.parallelize import parallelize

# (activation_checkpoint, ac_selective, activation_offload): every mode, offload off and on.
VALID = {
    "none": ("none", "block", False),
    "full": ("full", "block", False),
    "every_2nd_block": ("selective", "block", False),
    "op": ("selective", "op", False),
    "full_offload": ("full", "block", True),
    "every_2nd_block_offload": ("selective", "block", True),
}
# Offload needs whole checkpointed blocks: the config refuses these two in one line.
REFUSED = {"none_offload": ("none", "block", True), "op_offload": ("selective", "op", True)}
# The fast lane keeps the pair that used to compile nothing.
FAST = {"full_offload"}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    model.init_weights(0)
    tokens = torch.randint(0, 512, (2, 32))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return model, tokens, loss.detach(), grads


def _pcfg(mode: str) -> ParallelConfig:
    ac, selective, offload = {**VALID, **REFUSED}[mode]
    return ParallelConfig(
        activation_checkpoint=ac, ac_selective=selective, ac_every=2, activation_offload=offload
    )


@pytest.mark.parametrize(
    "mode", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in VALID]
)
def test_every_block_compiles(base, mode):
    from torch._dynamo.utils import counters

    model, tokens, ref_loss, ref_grads = copy.deepcopy(base[0]), *base[1:]
    tcfg = TrainConfig(compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    parallelize(
        model, ParallelDims(1, 1, 1, 1, 1), None, _pcfg(mode), tcfg, torch.device("cpu"), None
    )
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    # One graph serves the 4 blocks (the checkpointed and the plain ones share the code);
    # nothing fell back to eager.
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["calls_captured"] > 0
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[clean_name(name)], rtol=1e-5, atol=1e-6)
    # Checkpoints name the parameters as the plain model does, whatever wraps the blocks.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    assert get_model_state_dict(model).keys() == base[0].state_dict().keys()
    hooks = getattr(model, "activation_offload", None)
    if VALID[mode][2]:
        # Exactly the checkpointed blocks' inputs went to host memory, nothing from inside.
        blocks = 4 if VALID[mode][0] == "full" else 2
        assert hooks.num_offloaded == blocks
        assert hooks.bytes_offloaded == blocks * tokens.numel() * model.args.dim * 4


@pytest.mark.parametrize("mode", list(REFUSED))
def test_offload_without_whole_blocks_is_refused(mode):
    cfg = dataclasses.replace(Config(), parallel=_pcfg(mode))
    with pytest.raises(UserError, match="activation_offload=true"):
        validate(cfg)
