"""Check a megatron_rpp checkpoint against its HF source model: max |logit difference|
(a reward model, ``*ForSequenceClassification``: max |score difference| at every position).

    python tools/convert_checkpoints/verify.py --hf-dir H --megatron-dir M --tp 2 --pp 2

Spawns tp*pp gloo ranks that load the checkpoint (resharding if it was saved at another
layout) and run one token batch; runs transformers on the same batch in this process.
Prints a human-readable line, then as the LAST line JSON
{"max_abs_logit_diff": ..., "tp": N, "pp": M} (a reward model: "max_abs_score_diff"). Exit code 1 above --tolerance, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys

import _common  # noqa: F401  (repo on sys.path)


def main(argv: list[str] | None = None) -> int:
    from megatron_rpp.checkpoint.format import CheckpointError
    from megatron_rpp.checkpoint.verify import verify_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="the HF model folder the checkpoint was converted from")
    ap.add_argument("--megatron-dir", required=True, help="megatron_rpp checkpoint folder")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at (default 1; any, not only the saved one)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at (default 1)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted max |logit| (reward model: |score|) difference (default 1e-4; both sides compute in fp32)")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences in the random token batch (default 2)")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token batch (default 0)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before the spawned ranks are given up on (default 600)")
    args = ap.parse_args(argv)
    try:
        r = verify_checkpoint(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp, batch_size=args.batch_size,
                              seq_len=args.seq_len, seed=args.seed, timeout=args.timeout)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = r.max_abs_diff <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: max |{r.quantity} diff| = {r.max_abs_diff:.3e} over {r.num_tokens} tokens "
          f"(tolerance {args.tolerance:.1e}) at tp={r.tp} pp={r.pp}, checkpoint dtype {r.dtype}")
    print(json.dumps(r.as_json_dict()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
