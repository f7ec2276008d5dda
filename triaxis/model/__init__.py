from triaxis.model.args import ModelArgs, flops_per_token, param_counts
from triaxis.model.presets import PRESETS, build_model_args

__all__ = [
    "ModelArgs",
    "Transformer",
    "flops_per_token",
    "param_counts",
    "PRESETS",
    "build_model_args",
]


def __getattr__(name: str):
    # Lazy: the shape, counts and presets need no torch (the planner imports them); the
    # Transformer does.
    if name == "Transformer":
        from triaxis.model.llama import Transformer

        return Transformer
    raise AttributeError(f"module 'triaxis.model' has no attribute {name!r}")
