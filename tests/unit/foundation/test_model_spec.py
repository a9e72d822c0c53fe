"""Reading HF configs into ModelSpecs: supported fields, and clear errors for the rest."""
from dataclasses import replace

import pytest
import torch

from megatron_rpp.models.architectures import architecture_for_config, get_architecture
from megatron_rpp.models.spec import UnsupportedConfigError
from testlib.tiny_models import tiny_config


def test_spec_fields_from_tiny_llama():
    spec = architecture_for_config(tiny_config("llama")).model_spec(tiny_config("llama"))
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.num_query_groups) == (4, 256, 4, 2)
    assert spec.kv_channels == 64 and not spec.add_qkv_bias and not spec.tie_word_embeddings
    assert get_architecture("Qwen2ForCausalLM").model_spec(tiny_config("qwen2")).add_qkv_bias
    assert get_architecture("Qwen3ForCausalLM").model_spec(tiny_config("qwen3")).qk_layernorm


def test_unknown_architecture_lists_supported():
    cfg = dict(tiny_config("llama"), architectures=["MistralForCausalLM"])
    with pytest.raises(KeyError, match="LlamaForCausalLM"):
        architecture_for_config(cfg)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
        ("hidden_act", "gelu", "hidden_act"),
        ("mlp_bias", True, "mlp_bias"),
    ],
)
def test_unsupported_fields_are_named(field, value, match):
    cfg = dict(tiny_config("llama"), **{field: value})
    with pytest.raises(UnsupportedConfigError, match=match):
        architecture_for_config(cfg).model_spec(cfg)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"sliding_window": 2047}, "sliding_window=2047"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.75}},
         "partial_rotary_factor=0.75"),
        ({"resid_pdrop": 0.1}, "resid_pdrop=0.1"),
        ({"embd_pdrop": 0.1}, "embd_pdrop=0.1"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}}, "longrope"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}}, "'su'"),
    ],
)
def test_phi3_configs_we_do_not_build_are_named(changes, match):
    cfg = dict(tiny_config("phi3"), **changes)
    with pytest.raises(UnsupportedConfigError, match=f"Phi3ForCausalLM: .*{match}"):
        architecture_for_config(cfg).model_spec(cfg)


def test_phi3_spec_is_the_llama_model():
    """Phi-3 builds exactly Llama's Megatron model; only the HF names differ."""
    phi3, llama = tiny_config("phi3"), tiny_config("llama")
    s_phi3 = architecture_for_config(phi3).model_spec(phi3)
    s_llama = architecture_for_config(llama).model_spec(llama)
    assert s_phi3 == replace(s_llama, architecture="Phi3ForCausalLM")


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config("llama", rope_scaling=True)
    spec = architecture_for_config(cfg).model_spec(cfg)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = spec.rotary_inv_freq()
    torch.testing.assert_close(ours, inv_freq.float(), atol=0, rtol=1e-6)
    # All three bands occur: some frequencies unchanged, some divided by the factor.
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert (ours == plain).any() and torch.isclose(ours, plain / 8).any()
