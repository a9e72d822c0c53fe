"""Convert a Hugging Face safetensors folder into a megatron_rpp sharded checkpoint.

    python tools/convert_checkpoints/hf_to_megatron.py --hf-dir H --output-dir M --tp 8 --pp 4

Streams tensor by tensor (memory: ~3x the largest parameter). Exit code 2 on bad input.
See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (repo on sys.path)


def main(argv: list[str] | None = None) -> int:
    from megatron_rpp.checkpoint.convert import hf_to_megatron
    from megatron_rpp.checkpoint.format import DTYPES, CheckpointError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model folder (config.json + model.safetensors or an indexed set of shards)")
    ap.add_argument("--output-dir", required=True, help="Megatron checkpoint folder to create (must not exist unless --overwrite)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for (default 1); must divide intermediate_size; KV groups are zero-padded when it does not divide them, the vocabulary to a multiple of 128 x tp")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1); must divide num_hidden_layers")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the stored weights (default: the source dtype)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (only once the new checkpoint is complete)")
    args = ap.parse_args(argv)
    try:
        hf_to_megatron(args.hf_dir, args.output_dir, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite, log=print)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
