"""Fixed vs token-budget micro-batches on a length-skewed batch: padded tokens and step time side by side.

One policy update (forward + backward + Adam, ``trainer/update.py`` ``policy_update``) of the real
SmolLM2-135M-Instruct (fp32, one rank, fused output layer) on a synthetic batch whose responses
are spread evenly over 8…512 tokens (prompts 16…64 tokens), first with fixed micro-batches of
``--micro-batch-size`` length-sorted sequences, then with micro-batches filled up to
``--max-tokens`` (``trainer.max_tokens_per_micro_batch``). Both start from the same weights, one
warm-up update each is not timed; the loss of both must be the same (printed).

    python benchmarks/bench_token_budget.py [--sequences 16] [--micro-batch-size 4] [--max-tokens 2048]

Writes ``benchmarks/results/token_budget.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _batch(vocab: int, n: int):
    import torch

    from megatron_rpp.data.rollout_batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    responses = torch.linspace(8, 512, n).round().long()[torch.randperm(n, generator=g)].tolist()
    prompts = torch.randint(16, 65, (n,), generator=g).tolist()
    batch = RolloutBatch.from_sequences([torch.randint(3, vocab, (p,), generator=g).tolist() for p in prompts],
                                        [torch.randint(3, vocab, (r,), generator=g).tolist() for r in responses])
    mask = batch.response_mask
    return batch.replace(advantages=torch.randn(mask.shape, generator=g) * mask,
                         rollout_log_probs=-torch.rand(mask.shape, generator=g) * mask, old_log_probs=None)


def _rank(hf_dir: str, n: int, mbs: int, max_tokens: int) -> dict:
    from megatron_rpp.algorithms.policy_loss import PolicyLossConfig
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.data.rollout_batch import micro_batch_indices, padded_tokens
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training
    from megatron_rpp.trainer.update import StepSettings, policy_update

    groups = initialize_parallel(1, 1)
    cfg = load_hf_config(hf_dir)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(1)
    model = build_gpt_model(spec, groups)
    load_hf_weights(model, groups, arch, spec, hf_dir)
    init = {k: v.clone() for k, v in gather_full_params(model, groups).items()}
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-6))
    batch = _batch(spec.vocab_size, n)
    counts = {"tokens": batch.num_response_tokens, "seqs": len(batch),
              "max_response_len": int(batch.response_lengths.max())}
    lengths = batch.sequence_lengths
    rows = {}
    for name, budget in (("fixed", 0), ("token_budget", max_tokens)):
        settings = StepSettings(temperature=1.0, fused_output_layer=True, micro_batch_size=mbs, max_tokens=budget)
        parts = micro_batch_indices(lengths, mbs, budget)
        times, losses = [], []
        for _ in range(2):  # warm-up, timed
            load_full_params(model, groups, init)
            t0 = time.perf_counter()
            metrics = policy_update(ddp, opt, groups, batch, counts, PolicyLossConfig(clip_low=0.2, clip_high=0.2),
                                    settings)
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
        real = int(lengths.sum())
        rows[name] = {"micro_batches": len(parts), "real_tokens": real,
                      "padded_tokens": padded_tokens(lengths, parts) - real, "seconds": times[-1], "loss": losses[-1]}
    return {"sequences": n, "micro_batch_size": mbs, "max_tokens": max_tokens,
            "response_lengths": [8, 512], "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "token_budget.json"))
    args = ap.parse_args()
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.parallel.spawn import run_ranks

    hf_dir = str(materialize_smollm2())
    (result,) = run_ranks(_rank, 1, hf_dir, args.sequences, args.micro_batch_size, args.max_tokens, timeout=1800)
    print(f"\nSmolLM2-135M, {args.sequences} sequences, responses 8..512 tokens, one policy update")
    print(f"{'micro-batching':<22}{'micro-batches':>14}{'real tok':>10}{'padded tok':>12}{'seconds':>10}{'loss':>14}")
    for name, r in result["rows"].items():
        label = f"fixed ({args.micro_batch_size} seqs)" if name == "fixed" else f"budget ({args.max_tokens} tok)"
        print(f"{label:<22}{r['micro_batches']:>14}{r['real_tokens']:>10}{r['padded_tokens']:>12}"
              f"{r['seconds']:>10.2f}{r['loss']:>14.8f}")
    f, b = result["rows"]["fixed"], result["rows"]["token_budget"]
    result["budget_over_fixed_seconds"] = b["seconds"] / f["seconds"]
    print(f"token budget / fixed step time: {result['budget_over_fixed_seconds']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
