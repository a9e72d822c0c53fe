"""Each kind of bad input is a clear error, and a failed conversion leaves nothing that looks complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpp.checkpoint.convert import MegatronCheckpointReader, hf_to_megatron, megatron_to_hf
from megatron_rpp.checkpoint.format import METADATA_FILE, CheckpointError, shard_file_name
from testlib.tiny_checkpoints import case_config, save_tiny_hf

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", case_config("llama"))


@pytest.fixture(scope="module")
def mg_dir(hf_dir, tmp_path_factory):
    return hf_to_megatron(hf_dir, tmp_path_factory.mktemp("mg") / "ckpt", tp=2, pp=2)


def _copy_hf(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        dst.joinpath(p.name).write_bytes(p.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _copy_megatron(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            dst.joinpath(p.name).write_bytes(p.read_bytes())
    return dst


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_output_dir_exists(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        hf_to_megatron(hf_dir, tmp_path / "out", tp=1, pp=1)
    hf_to_megatron(hf_dir, tmp_path / "out", tp=1, pp=1, overwrite=True)
    assert (tmp_path / "out" / METADATA_FILE).is_file()
    assert _leftovers(tmp_path) == ["out"]


def test_missing_config_and_weights(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no HF config"):
        hf_to_megatron(tmp_path, tmp_path / "out", tp=1, pp=1)
    bad = _copy_hf(hf_dir, tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_to_megatron(bad, tmp_path / "out", tp=1, pp=1)


def test_missing_shard_listed_in_index(hf_dir, tmp_path):
    bad = _copy_hf(hf_dir, tmp_path / "indexed")
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    names = json.loads(json.dumps({"lm_head.weight": "model-00002-of-00002.safetensors"}))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors listed in .* is missing"):
        hf_to_megatron(bad, tmp_path / "out", tp=1, pp=1)


def test_truncated_hf_file(hf_dir, tmp_path):
    bad = _copy_hf(hf_dir, tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or partial"):
        hf_to_megatron(bad, tmp_path / "out", tp=1, pp=1)


def test_unsupported_architecture(hf_dir, tmp_path):
    bad = _copy_hf(hf_dir, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="unsupported model.*GPT2LMHeadModel.*LlamaForCausalLM"):
        hf_to_megatron(bad, tmp_path / "out", tp=1, pp=1)
    bad2 = _copy_hf(hf_dir, tmp_path / "rope", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="yarn"):
        hf_to_megatron(bad2, tmp_path / "out", tp=1, pp=1)


def test_tp_pp_that_do_not_divide(hf_dir, tmp_path):
    # intermediate 512, 4 layers: tp=3 does not divide the ffn; KV groups and the vocabulary would be padded.
    with pytest.raises(CheckpointError, match="intermediate_size=512 is not divisible by tensor_parallel_size=3"):
        hf_to_megatron(hf_dir, tmp_path / "out", tp=3, pp=1)
    with pytest.raises(CheckpointError, match="num_hidden_layers=4 is not divisible by pipeline_parallel_size=3"):
        hf_to_megatron(hf_dir, tmp_path / "out", tp=1, pp=3)
    assert _leftovers(tmp_path) == []


def test_weights_that_do_not_fit_the_config(hf_dir, tmp_path):
    # config says 500 tokens, the embedding has 512 rows: named, before anything is published.
    bad = _copy_hf(hf_dir, tmp_path / "vocab", vocab_size=500)
    with pytest.raises(CheckpointError, match="embedding.word_embeddings.weight.*512 rows, config vocab_size is 500"):
        hf_to_megatron(bad, tmp_path / "out", tp=2, pp=1)
    assert _leftovers(tmp_path) == ["vocab"]


def test_metadata_that_disagrees_with_the_parameter_table(mg_dir, tmp_path):
    bad = _copy_megatron(mg_dir, tmp_path / "ckpt")
    meta = json.loads((bad / METADATA_FILE).read_text())
    (qkv,) = [p for p in meta["params"] if p["name"] == "decoder.layers.0.self_attention.linear_qkv.weight"]
    qkv["partition_dim"] = 1  # column-parallel (dim 0) in Megatron and in the table
    (bad / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="metadata says .*parameter table"):
        MegatronCheckpointReader(bad)


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path):
    # config says 5 layers, weights hold 4: fails mid-way, after shard files were started.
    bad = _copy_hf(hf_dir, tmp_path / "bad", num_hidden_layers=5)
    with pytest.raises(CheckpointError, match="model.layers.4.*missing"):
        hf_to_megatron(bad, tmp_path / "out", tp=1, pp=1)
    # config says 3 layers, weights hold 4: layer 3 would be silently dropped.
    bad3 = _copy_hf(hf_dir, tmp_path / "bad3", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="not used by the LlamaForCausalLM mapping.*model.layers.3"):
        hf_to_megatron(bad3, tmp_path / "out", tp=1, pp=1)
    assert _leftovers(tmp_path) == ["bad", "bad3"]


def test_incomplete_or_damaged_megatron_checkpoint(mg_dir, tmp_path):
    bad = _copy_megatron(mg_dir, tmp_path / "ckpt")
    f = bad / shard_file_name(1, 1)
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="model-tp01-pp01.safetensors is .* bytes, metadata says"):
        megatron_to_hf(bad, tmp_path / "out")
    f.unlink()
    with pytest.raises(CheckpointError, match="model-tp01-pp01.safetensors is missing"):
        MegatronCheckpointReader(bad)
    (bad / METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match="no megatron_checkpoint.json.*incomplete"):
        megatron_to_hf(bad, tmp_path / "out")
    assert _leftovers(tmp_path) == ["ckpt"]


def test_dtype_mismatch_in_shard_file(mg_dir, tmp_path):
    bad = _copy_megatron(mg_dir, tmp_path / "ckpt")
    meta = json.loads((bad / METADATA_FILE).read_text())
    meta["dtype"] = "bf16"
    (bad / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="dtype mismatch.*F32, metadata says bf16"):
        MegatronCheckpointReader(bad)


def test_bf16_conversion_and_cli_errors(hf_dir, tmp_path):
    out = hf_to_megatron(hf_dir, tmp_path / "bf16", tp=1, pp=2, dtype="bf16")
    assert MegatronCheckpointReader(out).meta.dtype == "bf16"
    back = megatron_to_hf(out, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    cli = REPO / "tools" / "convert_checkpoints" / "hf_to_megatron.py"
    r = subprocess.run([sys.executable, str(cli), "--hf-dir", str(hf_dir), "--output-dir", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
