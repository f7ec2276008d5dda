"""Typed run configuration: one dataclass per section (`sections`), loaded from TOML plus
`--section.field=value` (`load`), checked against the rules between fields (`rules`).

Every field carries its documentation in the docstring that follows it, which `triaxis config
--fields` prints and docs/config.md is generated from (`triaxis.config_doc`). Each error names the
value, the rule and the fix.
"""

from triaxis.config.load import (
    check_config,
    field_docs,
    load_config,
    parse_overrides,
    split_config_args,
    to_toml,
)
from triaxis.config.rules import (
    attention_span,
    composition_problem,
    grad_accum_steps,
    validate,
)
from triaxis.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    LoraConfig,
    MetricsConfig,
    ModelConfig,
    ParallelConfig,
    ProfileConfig,
    SourceConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LoraConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParallelConfig",
    "ProfileConfig",
    "SourceConfig",
    "TrainConfig",
    "attention_span",
    "check_config",
    "composition_problem",
    "field_docs",
    "grad_accum_steps",
    "load_config",
    "parse_overrides",
    "split_config_args",
    "to_toml",
    "validate",
]
