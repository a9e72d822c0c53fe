"""Tiny random HF models on disk, with the real SmolLM2 tokenizer (for end-to-end runs)."""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _publish(model, tok_dir: Path, path: Path) -> Path:
    """Save ``model`` with SmolLM2's tokenizer files into ``path`` (via a temporary folder)."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, tmp / f)
    tmp.rename(path)
    return path


def make_tiny_hf_dir(path: str | Path, arch: str = "llama", *, tied: bool = False, seed: int = 0,
                     num_layers: int = 2) -> Path:
    """A ``num_layers``-layer (default 2) random model of ``arch`` with SmolLM2's tokenizer and vocabulary (49152)."""
    import torch
    import transformers

    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from testlib.tiny_models import tiny_config

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok_dir = materialize_smollm2()
    cfg = tiny_config(arch, tied=tied)
    cfg.update(vocab_size=49152, num_hidden_layers=num_layers, hidden_size=128, intermediate_size=256,
               num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    return _publish(model, tok_dir, path)


def make_tiny_reward_hf_dir(path: str | Path, *, seed: int = 1) -> Path:
    """A 2-layer random ``LlamaForSequenceClassification`` (one score) with SmolLM2's tokenizer
    and vocabulary, so it scores the tiny policy's token ids. Score head std 1/sqrt(H): O(1) scores."""
    import torch
    import transformers

    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from testlib.tiny_models import tiny_config

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok_dir = materialize_smollm2()
    cfg = tiny_config("llama", tied=False)
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1, vocab_size=49152,
               num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(hf_cfg).to(torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, hf_cfg.hidden_size ** -0.5)
    return _publish(model, tok_dir, path)
