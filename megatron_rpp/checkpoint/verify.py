"""Check a Megatron checkpoint against its HF source: same token batch, compare outputs.

Language models compare logits at every position; reward models (a score head,
``*ForSequenceClassification``) compare the score at every position — the value HF's
sequence classification pools at a sequence's last token.

The Megatron side runs on ``tp * pp`` spawned gloo ranks (:func:`megatron_logits_on_rank`
is the per-rank work, usable inside any existing world); the HF side runs
``transformers`` in the calling process. Both compute in fp32. When the checkpoint is
stored in a lower precision, the HF weights are rounded to that dtype first, so the
check measures the conversion, not the precision loss.

Shapes: B batch, S sequence, V vocabulary, V/tp one TP rank's vocabulary shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


#: What is compared, per model head.
QUANTITY = {"lm": "logit", "score": "score"}


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    tp: int
    pp: int
    dtype: str
    num_tokens: int
    quantity: str = "logit"  # "logit" (language model) or "score" (reward model)

    def as_json_dict(self) -> dict:
        return {f"max_abs_{self.quantity}_diff": self.max_abs_diff, "tp": self.tp, "pp": self.pp}


def sample_tokens(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """A deterministic random token batch. Shape: [B, S] long."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)


def megatron_logits_on_rank(megatron_dir: str, tp: int, pp: int, input_ids: torch.Tensor):
    """Per-rank work: build the model at TP×PP, load the checkpoint, forward ``input_ids``.

    Call on every rank of an initialised world whose size is a multiple of ``tp * pp``.

    Returns:
        Full logits [B, S, V] fp32 (a reward model: scores [B, S, 1] fp32) on data-parallel
        rank 0, TP rank 0 of the last stage; None on every other rank.
    """
    from megatron_rpp.checkpoint.convert import MegatronCheckpointReader
    from megatron_rpp.checkpoint.live import load_megatron_checkpoint
    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.scoring import forward_score
    from megatron_rpp.parallel.gather import gather_tp
    from megatron_rpp.parallel.groups import initialize_parallel

    groups = initialize_parallel(tp, pp)
    base_spec = MegatronCheckpointReader(megatron_dir).base_spec
    model = build_gpt_model(base_spec.for_tp(tp), groups, dtype=torch.float32)
    load_megatron_checkpoint(model, groups, megatron_dir, allow_dtype_cast=True)

    def every_position(output, mb, ids, resp_index):  # [b, S, V/tp]; a score head's [b, S, 1] is not sharded
        full = output.float()
        if base_spec.head == "lm":
            full = gather_tp(full, groups, partition_dim=output.dim() - 1, gated=False)  # [b, S, V']
            full = full[..., : base_spec.vocab_size]  # vocabulary padding dropped: [b, S, V]
        return full

    batch = RolloutBatch.from_sequences(input_ids.tolist(), [[] for _ in range(input_ids.shape[0])])
    out = forward_score(model, groups, batch, every_position, micro_batch_size=len(batch))
    if out is not None and groups.tp_rank == 0 and groups.dp_rank == 0:
        return out
    return None


def _verify_rank(megatron_dir: str, tp: int, pp: int, input_ids: torch.Tensor):
    return megatron_logits_on_rank(megatron_dir, tp, pp, input_ids)


def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor, *, round_to: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' logits [B, S, V] fp32 (weights rounded to ``round_to`` first)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    if round_to != torch.float32:
        model.to(round_to).to(torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def hf_scores(hf_dir: str | Path, input_ids: torch.Tensor, *, round_to: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' sequence-classification scores at every position, [B, S, 1] fp32.

    ``score(base_model(input_ids))`` is what HF's forward computes before pooling at the
    last non-padding token, so no pad id can move the compared position.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                               attn_implementation="eager")
    if round_to != torch.float32:
        model.to(round_to).to(torch.float32)
    model.eval()
    with torch.no_grad():
        return model.score(model.base_model(input_ids=input_ids).last_hidden_state).float()


#: The transformers reference, per model head.
HF_REFERENCE = {"lm": hf_logits, "score": hf_scores}


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


def verify_checkpoint(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    *,
    tp: int,
    pp: int,
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    timeout: float = 600.0,
) -> VerifyResult:
    """Max |logit| (reward model: |score|) difference between transformers on ``hf_dir`` and
    Megatron on ``megatron_dir`` at TP×PP."""
    from megatron_rpp.checkpoint.convert import MegatronCheckpointReader
    from megatron_rpp.checkpoint.format import validate_layout
    from megatron_rpp.parallel.spawn import run_ranks

    ckpt = MegatronCheckpointReader(megatron_dir)  # fails fast on a bad folder, before spawning
    validate_layout(ckpt.base_spec.for_tp(tp), tp, pp)
    seq_len = min(seq_len, ckpt.base_spec.max_position_embeddings)
    input_ids = sample_tokens(ckpt.base_spec.vocab_size, batch_size, seq_len, seed)
    results = run_ranks(_verify_rank, tp * pp, str(megatron_dir), tp, pp, input_ids, timeout=timeout)
    (mg,) = [r for r in results if r is not None]
    head = ckpt.base_spec.head
    ref = HF_REFERENCE[head](hf_dir, input_ids, round_to=ckpt.meta.torch_dtype)
    return VerifyResult(compare_logits(mg, ref), tp, pp, ckpt.meta.dtype, input_ids.numel(), QUANTITY[head])
