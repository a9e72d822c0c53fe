"""Export a megatron_rpp sharded checkpoint (saved at any TP/PP) as a Hugging Face folder.

    python tools/convert_checkpoints/megatron_to_hf.py --megatron-dir M --output-dir H

Writes safetensors (sharded with an index above --max-shard-gb), config.json and the
tokenizer / chat-template files stored with the checkpoint; loadable by transformers
and vLLM. Streams tensor by tensor. Exit code 2 on bad input. See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (repo on sys.path)


def main(argv: list[str] | None = None) -> int:
    from megatron_rpp.checkpoint.convert import megatron_to_hf
    from megatron_rpp.checkpoint.format import CheckpointError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-dir", required=True, help="megatron_rpp checkpoint folder (holds megatron_checkpoint.json)")
    ap.add_argument("--output-dir", required=True, help="HF folder to create (must not exist unless --overwrite)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file to write, in GiB (default 5)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (only once the export is complete)")
    args = ap.parse_args(argv)
    try:
        megatron_to_hf(args.megatron_dir, args.output_dir, overwrite=args.overwrite,
                       max_shard_bytes=int(args.max_shard_gb * 1024**3), log=print)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
