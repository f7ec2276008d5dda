"""FP8 training (train.float8): which linears convert, the one all-gather decision, bad input,
and float8 runs against the bf16 run and across layouts."""

import pytest
import torch

pytest.importorskip("torchao", reason="the float8 extra is part of the test extra")

from triaxis.config import load_config  # noqa: E402
from triaxis.config.rules import validate  # noqa: E402
from triaxis.errors import UserError  # noqa: E402
from triaxis.model import Transformer  # noqa: E402
from triaxis.model.presets import PRESETS  # noqa: E402
from triaxis.parallel.float8 import convert_float8, float8_all_gather  # noqa: E402

BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
BLOCK_LINEARS += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _tiny() -> Transformer:
    with torch.device("meta"):
        return Transformer(PRESETS["tiny"])


def _converted(model) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]


def test_converts_exactly_the_block_linears_over_the_size_filter():
    model = _tiny()
    names = convert_float8(model, "tensorwise", 16, fsdp_float8_all_gather=False)
    expected = [f"layers.{i}.{lin}" for i in range(4) for lin in BLOCK_LINEARS]
    assert sorted(names) == sorted(expected) and sorted(_converted(model)) == sorted(expected)
    # Embedding and head stay as they were.
    assert type(model.tok_embeddings) is torch.nn.Embedding
    assert type(model.output) is torch.nn.Linear
    # tiny: dim 64, 2 kv heads x 16 = 32 (wk, wv), ffn 192. min_dim 64 drops wk and wv.
    model = _tiny()
    names = convert_float8(model, "rowwise", 64, fsdp_float8_all_gather=False)
    wide = [n for n in expected if not n.endswith(("wk", "wv"))]
    assert sorted(names) == sorted(wide) == sorted(_converted(model))


def test_nothing_over_the_filter_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"float8_min_dim=1024.*lower") as err:
        convert_float8(_tiny(), "tensorwise", 1024, fsdp_float8_all_gather=False)
    assert "\n" not in str(err.value)


def test_float8_all_gather_only_tensorwise_on_cuda_when_sharded():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert float8_all_gather("tensorwise", cuda, 2)
    assert not float8_all_gather("tensorwise", cpu, 2)  # gloo: "Invalid scalar type"
    assert not float8_all_gather("rowwise", cuda, 2)
    assert not float8_all_gather("tensorwise", cuda, 1)


def _cfg(*args):
    return load_config(None, ["--model.preset=tiny", *args])


def test_bad_input_one_line(monkeypatch):
    with pytest.raises(UserError, match="rowwise.*fp32.*--train.dtype=bf16"):
        validate(_cfg("--train.float8=rowwise", "--train.dtype=fp32"))
    validate(_cfg("--train.float8=tensorwise", "--train.dtype=fp32"))  # supported
    with pytest.raises(UserError, match="float8"):
        _cfg("--train.float8=blockwise")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a)
    )
    with pytest.raises(UserError, match=r"needs torchao.*triaxis\[float8\]") as err:
        validate(_cfg("--train.float8=tensorwise"))
    assert "\n" not in str(err.value)
