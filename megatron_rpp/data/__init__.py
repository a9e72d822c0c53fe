"""Prompt datasets (JSONL, Parquet, reasoning-gym), chat templates, rollout batches."""
