"""Config loading: YAML + dotted overrides, errors naming the key, docs for every field."""
import dataclasses
from pathlib import Path

import pytest

from megatron_rpp.config import ConfigError, help_text, load_config, save_config
from megatron_rpp.config.loader import field_docs
from megatron_rpp.config.schema import Config

ROOT = Path(__file__).parents[3]


def test_every_field_has_a_docstring_and_docs_are_current():
    for sec in dataclasses.fields(Config):
        cls = type(getattr(Config(), sec.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{sec.name}.{f.name} has no docstring"
    assert help_text() in (ROOT / "docs" / "config.md").read_text(), "regenerate docs/config.md"


def test_overrides_and_types(tmp_path):
    cfg = load_config(ROOT / "examples/configs/cpu_demo.yaml", ["trainer.steps=3", "trainer.lr=1e-4"])
    assert cfg.trainer.steps == 3 and cfg.trainer.lr == 1e-4
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg  # the resolved config reloads to the same value


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.stepz=1", "trainer.stepz"),
        ("trainer.steps=abc", "trainer.steps"),
        ("algorithm.estimator=ppo2", "allowed values: dr_grpo, gae, grpo, reinforce_pp"),
        ("algorithm.kl_estimator=k9", "k1, k2, k3"),
        ("trainer.train_batch_size=7", "must divide"),
        ("trainer.num_workers=3", "multiple of"),
        ("nosection.x=1", "allowed keys: model, data"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_example_configs_load():
    for path in sorted((ROOT / "examples/configs").glob("*.yaml")):
        load_config(path)
