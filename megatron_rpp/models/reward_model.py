"""Bradley-Terry reward model on Megatron: a GPTModel trunk with a scalar score head.

    model, spec = build_reward_model(hf_dir, groups)          # this rank's shard, loaded, frozen
    scores = score_sequences(model, groups, sequences, micro_batch_size=4)  # [B] on the last stage
    rewards = normalize_scores(scores, mean=0.0, std=1.0)

``hf_dir`` is a HF ``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification`` /
``Qwen3ForSequenceClassification`` folder (architectures/sequence_classification.py maps
its weights). The model is split over the same TP×PP groups as the policy. The reward of a
sequence is the score at its last token, which is what HF's sequence classification returns
(it pools at the last non-padding token). Sequences are right-padded to a micro-batch;
causal attention keeps the padding from reaching any earlier position, so no pad id is needed.

Letters: B sequences, S longest sequence, H hidden size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_rpp.parallel.groups import ParallelGroups


class ScalarHead(torch.nn.Module):
    """GPTModel's ``output_layer`` for a reward model. Shape: hidden [S, B, H] -> scores [S, B, 1].

    Takes the call GPTModel makes on its (vocab-parallel) output layer and returns
    ``(output, bias)`` like it. The weight ``score.weight`` [1, H] is replicated on every
    TP rank, not sharded: its input (the final-norm hidden states) is already whole and
    identical on every TP rank, so every rank computes the same scores. With sequence
    parallelism (``tp_group`` given) the input is this rank's [S/tp, B, H] slice and is
    all-gathered along the sequence first, as Megatron's own output layer does.
    """

    def __init__(self, hidden_size: int, num_labels: int, dtype: torch.dtype, *, tp_group=None):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, num_labels, bias=False, dtype=dtype)
        self.sequence_parallel_group = tp_group

    def forward(self, hidden_states: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        if weight is not None:
            raise ValueError("a score head is never tied to the embedding (build with tie_word_embeddings=False)")
        if self.sequence_parallel_group is not None:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=self.sequence_parallel_group)
        return self.score(hidden_states), None


def reward_architectures() -> list[str]:
    """Registered architectures with a score head (valid ``reward.model_dir`` models)."""
    from megatron_rpp.models.architectures import ARCHITECTURES

    return [n for n in ARCHITECTURES.names() if n.endswith("ForSequenceClassification")]


def build_reward_model(
    hf_dir: str | Path, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32, vocab_size: int | None = None,
    options=None,
):
    """This rank's shard of the reward model in ``hf_dir``, weights loaded, in eval mode, frozen.

    Args:
        vocab_size: the policy's vocabulary size, when the reward model scores the policy's
            token ids (it must then share the policy's tokenizer); a mismatch is an error.
        options: the policy's ``provider.ModelOptions`` (sequence parallelism must match the
            policy's layout; recompute does not matter for a forward-only model).
    Returns:
        ``(model, spec)``; the model's forward gives scores [B, S, 1] on the last stage.
    """
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import ModelOptions, build_model
    from megatron_rpp.models.spec import load_hf_config

    options = options or ModelOptions()

    hf_config = load_hf_config(hf_dir)
    arch = architecture_for_config(hf_config)
    spec = arch.model_spec(hf_config).for_tp(groups.tp_size)
    if spec.head != "score":
        raise ValueError(
            f"reward model {str(hf_dir)!r} is a {arch.name}, not a sequence-classification model "
            f"(supported: {', '.join(reward_architectures())})"
        )
    if vocab_size is not None and spec.vocab_size != vocab_size:
        raise ValueError(
            f"reward model {str(hf_dir)!r} has vocab_size {spec.vocab_size}, the policy {vocab_size}: "
            "the reward model scores the policy's token ids and must share its tokenizer"
        )
    model = build_model(spec, groups, dtype=dtype, options=options)
    load_hf_weights(model, groups, arch, spec, hf_dir)
    model.eval().requires_grad_(False)
    return model, spec


def normalize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Static normalisation ``(score - mean) / std`` (``reward.model_mean`` / ``reward.model_std``).

    Shape: [B] -> [B]."""
    return (scores - mean) / std


def score_sequences(
    model, groups: ParallelGroups, sequences: list[list[int]], *, micro_batch_size: int
) -> torch.Tensor | None:
    """Reward-model score of each token sequence (prompt + response), in input order.

    Collective over the model's TP×PP group (every rank calls it with the same sequences);
    through :func:`~megatron_rpp.models.scoring.forward_score` (length-sorted micro-batches,
    any PP). The trainer scores a :class:`RolloutBatch` directly (``Worker.reward_scores``).

    Returns:
        [B] fp32 on every rank of the last pipeline stage; None on other stages.
    """
    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.scoring import forward_score, last_token_head

    if sequences and min(map(len, sequences)) < 1:
        raise ValueError("cannot score an empty sequence")
    batch = RolloutBatch.from_sequences(sequences, [[] for _ in sequences])
    return forward_score(model, groups, batch, last_token_head, micro_batch_size=micro_batch_size)
