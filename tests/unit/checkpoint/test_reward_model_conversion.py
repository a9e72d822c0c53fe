"""Reward models (HF *ForSequenceClassification): conversion round trip, layout, clear errors,
and the pure scoring helpers. (Scores vs transformers at TP/PP: tests/distributed/test_reward_model.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rpp.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_rpp.checkpoint.format import CheckpointError, shard_file_name
from megatron_rpp.config import ConfigError, load_config
from megatron_rpp.models.architectures import architecture_for_config
from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.models.reward_model import normalize_scores
from megatron_rpp.models.scoring import last_token_head
from megatron_rpp.models.spec import UnsupportedConfigError
from testlib.tiny_checkpoints import reward_model_config, save_tiny_reward_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_reward_model_round_trip_is_bit_exact(tmp_path, family):
    cfg = reward_model_config(family)
    hf = save_tiny_reward_model(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    back = megatron_to_hf(mg, tmp_path / "back")
    src, out = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert "score.weight" in src and "lm_head.weight" not in src
    assert sorted(out) == sorted(src)
    for name, t in src.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    out_cfg = json.loads((back / "config.json").read_text())
    assert out_cfg["architectures"] == cfg["architectures"]

    # The scalar head is replicated: stored once, whole ([1, H]), on the last stage's TP-rank-0 file.
    last0, last1 = load_file(mg / shard_file_name(0, 1)), load_file(mg / shard_file_name(1, 1))
    assert torch.equal(last0["output_layer.score.weight"], src["score.weight"])
    assert "output_layer.score.weight" not in last1
    assert not any(n == "output_layer.weight" for n in last0)


def test_spec_has_score_head_never_tied():
    cfg = dict(reward_model_config("llama"), tie_word_embeddings=True)
    spec = architecture_for_config(cfg).model_spec(cfg)
    assert (spec.head, spec.num_labels, spec.tie_word_embeddings) == ("score", 1, False)


@pytest.mark.parametrize("labels", [{"num_labels": 3}, {"id2label": {"0": "bad", "1": "good"}}])
def test_more_than_one_label_is_an_error_naming_it(tmp_path, labels):
    cfg = reward_model_config("qwen2")
    cfg.pop("num_labels")
    cfg.update(labels)  # transformers saves id2label, not num_labels
    with pytest.raises(UnsupportedConfigError, match=r"Qwen2ForSequenceClassification: num_labels=\d"):
        architecture_for_config(cfg).model_spec(cfg)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_labels"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=1, pp=1)


def test_last_token_head_picks_each_sequences_last_real_token():
    # Sequence 0 is 2 prompt + 1 response tokens, sequence 1 one prompt token: scores at positions 2 and 0.
    batch = RolloutBatch.from_sequences([[5, 6], [7]], [[8], []])
    scores = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]]).unsqueeze(-1)  # [B=2, S=4, 1]
    ids, resp_index = batch.model_inputs()
    assert last_token_head(scores, batch, ids, resp_index).tolist() == pytest.approx([0.3, 0.5])


def test_static_normalisation():
    # (score - mean) / std with mean 1, std 2: 3 -> 1, -1 -> -1, 1 -> 0.
    assert normalize_scores(torch.tensor([3.0, -1.0, 1.0]), mean=1.0, std=2.0).tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize(
    "overrides,message",
    [(["reward.model_std=0"], "reward.model_std: must be a finite number > 0"),
     (["reward.model_dir=/rm", "reward.remote_url=http://x"], "reward.model_dir: cannot be combined")],
)
def test_reward_model_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
