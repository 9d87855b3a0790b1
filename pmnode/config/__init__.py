"""Run configuration: what a swarm agrees on (RunConfig, loaded from YAML) and what one machine
chooses for itself (MachineConfig)."""

from pmnode.config.machine import MachineConfig
from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.config.run import (
    MOVED,
    SHIPPED_CONFIGS,
    RunConfig,
    format_validation_error,
    load_config,
    resolve_config_path,
)
from pmnode.config.sections import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    SubspaceConfig,
    SwarmConfig,
    TrainConfig,
)

__all__ = [
    "MOVED",
    "SHIPPED_CONFIGS",
    "DataConfig",
    "MachineConfig",
    "ModelConfig",
    "OptimConfig",
    "ReplicaSyncConfig",
    "RunConfig",
    "SubspaceConfig",
    "SwarmConfig",
    "TrainConfig",
    "format_validation_error",
    "load_config",
    "resolve_config_path",
]
