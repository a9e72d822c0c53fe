"""Typed configuration: dataclasses with field docs, YAML + dotted overrides, validation."""
from megatron_rpp.config.loader import ConfigError, help_text, load_config, save_config
from megatron_rpp.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "save_config", "help_text"]
