"""megatron_rpp."""
