"""Typed run configuration: dataclass schema -> YAML file -> `key=value` overrides.

Precedence is CLI > YAML > schema defaults. Every user mistake (unknown key, wrong
type, out-of-range value) raises ConfigError with one line that names the key, so a
typo never silently becomes a default.
"""

from dist_train.config.keys import KeyDoc, all_keys, key_docs, keys_table, yaml_value
from dist_train.config.loading import dump_yaml, load_config, to_dict
from dist_train.config.schema import (
    DATASETS,
    LOGGED_METRICS,
    LOSSES,
    METRICS,
    PREEMPT_SIGNALS,
    CheckpointConfig,
    Config,
    DataConfig,
    EarlyStopConfig,
    EmaConfig,
    KeepBestConfig,
    LoggingConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ProfileConfig,
    PruneConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
    setting,
)
from dist_train.config.validation import check_device, import_object, is_import_path, resolve_auto, validate
from dist_train.errors import ConfigError, UserError

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DATASETS",
    "DataConfig",
    "EarlyStopConfig",
    "EmaConfig",
    "KeepBestConfig",
    "KeyDoc",
    "LOGGED_METRICS",
    "LOSSES",
    "LoggingConfig",
    "METRICS",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "PREEMPT_SIGNALS",
    "ParallelConfig",
    "ProfileConfig",
    "PruneConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "UserError",
    "WandbConfig",
    "all_keys",
    "check_device",
    "dump_yaml",
    "import_object",
    "is_import_path",
    "key_docs",
    "keys_table",
    "load_config",
    "resolve_auto",
    "setting",
    "to_dict",
    "validate",
    "yaml_value",
]
