from triaxis.model.llama import ModelArgs, Transformer, flops_per_token, param_counts
from triaxis.model.presets import PRESETS, build_model_args

__all__ = ["ModelArgs", "Transformer", "flops_per_token", "param_counts", "PRESETS",
           "build_model_args"]
