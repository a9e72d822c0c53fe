"""Bradley-Terry reward models on Megatron (TP=2, TP2×PP2) score exactly like transformers.

Tiny random ``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification`` /
``Qwen3ForSequenceClassification`` (QK-norm) models (num_labels=1), saved by transformers.
One 4-rank gloo world runs, per family and layout:

- the trainer's path: ``build_reward_model`` straight from the HF folder, then
  ``score_sequences`` on ragged sequences (right-padded micro-batches of mixed lengths);
  the reference is transformers' own sequence-classification output, one unpadded
  sequence at a time (so HF pools at the true last token);
- the conversion path: the HF folder converted to a Megatron checkpoint at TP=2/PP=2,
  loaded and run like ``verify.py`` does; the reference is HF's score at every position.

Both sides compute in fp32; the differences come from the order of reductions across
TP shards (~1e-6 observed), so 1e-4 is a tight bound for scores of magnitude ~1.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rpp.checkpoint.convert import hf_to_megatron
from megatron_rpp.checkpoint.verify import hf_scores, sample_tokens
from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_checkpoints import reward_model_config, save_tiny_reward_model

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["llama", "qwen2", "qwen3"]
LAYOUTS = [(2, 1), (2, 2)]  # (tp, pp); 4 ranks: DP=2 at TP=2, DP=1 at TP2×PP2
LENGTHS = [5, 17, 9, 32, 1, 23]  # ragged: micro-batches of 4 mix lengths and pad
TOLERANCE = 1e-4


def ragged_sequences(vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def _rank_scores(hf_dirs: dict, ckpts: dict, sequences: list[list[int]], input_ids: torch.Tensor):
    from megatron_rpp.checkpoint.verify import megatron_logits_on_rank
    from megatron_rpp.models.reward_model import build_reward_model, score_sequences
    from megatron_rpp.parallel.groups import initialize_parallel

    out = {}
    for family in hf_dirs:
        for tp, pp in LAYOUTS:
            groups = initialize_parallel(tp, pp)
            model, spec = build_reward_model(hf_dirs[family], groups)
            scores = score_sequences(model, groups, sequences, micro_batch_size=4)
            out[("seq", family, tp, pp)] = scores if groups.tp_rank == 0 else None
            out[("pos", family, tp, pp)] = megatron_logits_on_rank(ckpts[family], tp, pp, input_ids)
    return out


def hf_last_token_scores(hf_dir: Path, sequences: list[list[int]]) -> list[float]:
    """transformers' sequence-classification output, one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in sequences]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    hf = {f: save_tiny_reward_model(root / f"{f}-hf", reward_model_config(f), seed=i) for i, f in enumerate(FAMILIES)}
    mg = {f: hf_to_megatron(hf[f], root / f"{f}-mg", tp=2, pp=2) for f in FAMILIES}
    return hf, mg


def test_reward_scores_match_transformers_at_tp2_and_pp2(reward_models):
    hf, mg = reward_models
    sequences = ragged_sequences(512)
    input_ids = sample_tokens(512, 2, 32, seed=1)
    res = run_ranks(_rank_scores, 4, {f: str(d) for f, d in hf.items()}, {f: str(d) for f, d in mg.items()},
                    sequences, input_ids, timeout=900)

    diffs = {}
    for family in FAMILIES:
        ref_seq = torch.tensor(hf_last_token_scores(hf[family], sequences))
        ref_pos = hf_scores(hf[family], input_ids)  # [B, S, 1]
        assert ref_seq.abs().max() > 0.3 and ref_seq.std() > 0.1  # real, distinct scores, not ~0
        for tp, pp in LAYOUTS:
            # Every TP-rank-0 of the last stage reports (one per DP replica); all must agree.
            seq = [r[("seq", family, tp, pp)] for r in res if r[("seq", family, tp, pp)] is not None]
            assert len(seq) == 4 // (tp * pp)
            (pos,) = [r[("pos", family, tp, pp)] for r in res if r[("pos", family, tp, pp)] is not None]
            assert pos.shape == ref_pos.shape == (2, 32, 1)
            diffs[(family, tp, pp, "last_token")] = max(float((s - ref_seq).abs().max()) for s in seq)
            diffs[(family, tp, pp, "every_position")] = float((pos - ref_pos).abs().max())
    print("max |score diff| vs transformers:", json.dumps({str(k): v for k, v in diffs.items()}))
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    assert not bad, bad


def test_verify_cli_reports_score_diff(reward_models):
    """tools/convert_checkpoints/verify.py on a reward model: PASS and max |Δscore| as JSON."""
    hf, mg = reward_models
    cli = REPO / "tools" / "convert_checkpoints" / "verify.py"
    r = subprocess.run([sys.executable, str(cli), "--hf-dir", str(hf["qwen2"]), "--megatron-dir", str(mg["qwen2"]),
                        "--tp", "2", "--pp", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith("PASS: max |score diff|"), lines[-2]
    result = json.loads(lines[-1])
    assert set(result) == {"max_abs_score_diff", "tp", "pp"}
    assert result["tp"] == 2 and result["max_abs_score_diff"] <= TOLERANCE
