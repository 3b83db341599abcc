"""Typed run configuration: dataclasses are the schema, YAML files are instances.

Files in ``configs/`` compose left to right, then dotted overrides (``train.steps=20``)
apply last::

    cope-megatron train configs/model/125m.yaml configs/pe/cope.yaml parallel.tensor=2

``schema`` holds the sections, ``loading`` reads files and overrides into them (unknown
keys and wrong types are errors), and ``validation`` checks cross-field constraints before
any process group or model exists, naming the key to change.
"""

from cope_megatron.config.layout import Layout
from cope_megatron.config.loading import (
    dump_yaml,
    flat_keys,
    load_config,
    merge_dicts,
    to_dict,
    yaml_text,
)
from cope_megatron.config.pe_options import (
    AlibiOptions,
    CopeOptions,
    FireOptions,
    KerpleOptions,
    LengthScaleOptions,
    PEConfig,
    RopeOptions,
    RopeScalingOptions,
    T5Options,
)
from cope_megatron.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    FusionConfig,
    LoggingConfig,
    MixtureSource,
    ModelConfig,
    ParallelConfig,
    RulerConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    ZeroConfig,
)
from cope_megatron.config.validation import padded_vocab_size, validate

__all__ = [
    "AlibiOptions", "Config", "ConfigError", "CopeOptions", "DataConfig", "EvalConfig",
    "FireOptions", "FusionConfig", "KerpleOptions", "Layout", "LengthScaleOptions",
    "LoggingConfig", "MixtureSource", "ModelConfig", "PEConfig", "ParallelConfig", "RopeOptions",
    "RopeScalingOptions", "RulerConfig", "RunConfig", "T5Options", "TaskConfig",
    "TrainConfig", "ZeroConfig", "dump_yaml", "flat_keys", "load_config", "merge_dicts",
    "padded_vocab_size", "to_dict", "validate", "yaml_text",
]
