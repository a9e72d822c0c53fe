"""Tiny random HF checkpoints on disk for the conversion tests (transformers from_config + save)."""
from __future__ import annotations

from pathlib import Path

from testlib.tiny_models import tiny_config

#: name -> tiny_config arguments. "llama_padded" has 6 heads in 3 KV groups: TP=2 pads KV
#: groups (like SmolLM2's 9 heads / 3 groups). "*_odd_vocab": vocabularies no TP divides,
#: padded by ModelSpec.for_tp (509 -> 512 at TP 1 and 2; 383 -> 384 at TP=1, 512 at TP=2).
#: "phi3_padded": Phi-3's fused layout with KV-group and vocabulary padding at once.
CASES = {
    "llama": dict(arch="llama", tied=False),
    "llama_tied": dict(arch="llama", tied=True),
    "llama_rope_scaling": dict(arch="llama", tied=False, rope_scaling=True),
    "qwen2": dict(arch="qwen2", tied=False),
    "qwen2_tied": dict(arch="qwen2", tied=True),
    "qwen3": dict(arch="qwen3", tied=False),
    "qwen3_tied": dict(arch="qwen3", tied=True),
    "llama_padded": dict(arch="llama", tied=True, heads=(6, 3)),
    "llama_odd_vocab": dict(arch="llama", tied=False, vocab_size=509),
    "qwen2_odd_vocab": dict(arch="qwen2", tied=True, vocab_size=509),
    "qwen3_odd_vocab": dict(arch="qwen3", tied=False, vocab_size=383),
    "phi3": dict(arch="phi3", tied=False),
    "phi3_padded": dict(arch="phi3", tied=False, heads=(6, 3), vocab_size=383),
}


def case_config(case: str) -> dict:
    kw = dict(CASES[case])
    arch = kw.pop("arch")
    heads = kw.pop("heads", None)
    cfg = tiny_config(arch, **kw)
    if heads:
        cfg.update(num_attention_heads=heads[0], num_key_value_heads=heads[1], hidden_size=64 * heads[0])
    return cfg


def save_tiny_hf(path: str | Path, cfg: dict, *, seed: int = 0) -> Path:
    """Save a randomly initialised transformers model of ``cfg`` to ``path`` (safetensors)."""
    import torch
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped one cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return Path(path)


#: Tiny reward models (HF sequence classification, num_labels=1) per family.
REWARD_MODEL_CLASSES = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


def reward_model_config(family: str) -> dict:
    """A tiny ``<Family>ForSequenceClassification`` config (the family's tiny config, one score)."""
    cfg = tiny_config(family, tied=False)
    cfg.update(architectures=[REWARD_MODEL_CLASSES[family]], num_labels=1)
    return cfg


def save_tiny_reward_model(path: str | Path, cfg: dict, *, seed: int = 0) -> Path:
    """Save a random transformers ``<Family>ForSequenceClassification`` (num_labels=1) to ``path``.

    Norms and biases are randomised like :func:`save_tiny_hf`; the score head gets std
    1/sqrt(H) so scores are O(1) and a tolerance of 1e-4 is a real test.
    """
    import torch
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg["architectures"][0])(hf_cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif name == "score.weight":
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.save_pretrained(path)
    return Path(path)
