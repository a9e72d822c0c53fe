"""Validation before launch: every numeric range, plug-ins, hyperparameter dataclasses, layouts.

Everything here runs ``load_config`` in-process (no model, no engine); the CLI's exit code and
speed on the same table are checked in tests/e2e/test_train_cli.py.
"""
import dataclasses
import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_rpp.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageEstimator, returns_as_advantages
from megatron_rpp.config import ConfigError, load_config
from megatron_rpp.config import hyper, validate
from megatron_rpp.config.schema import Config
from testlib.bad_configs import BAD_VALUES, model_folders, with_folders

ROOT = Path(__file__).parents[3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("overrides,key,allowed", BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_values_name_key_and_allowed_range(overrides, key, allowed, folders):
    with pytest.raises(ConfigError) as err:
        load_config(None, with_folders(overrides, folders))
    message = str(err.value)
    assert message.startswith(key + ":") or f"{key} (" in message, message
    assert allowed in message, message


def _numeric_fields() -> list[str]:
    keys = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        hints = typing.get_type_hints(cls)
        keys += [f"{sec.name}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]
    return keys


def test_every_numeric_field_has_a_range():
    ruled = set(validate.AT_LEAST) | set(validate.SEEDS) | set(validate.RANGES) | set(validate.SPECIAL)
    assert ruled == set(_numeric_fields())  # no field without a rule, no rule for a field that does not exist
    assert all(validate.allowed_range(k) for k in ruled)


def _just_outside(low, high, low_open, high_open):
    """Values the interval excludes: its open ends, just past its closed ends, NaN, inf where excluded."""
    out = [math.nan]
    if low != -math.inf:
        out.append(low if low_open else low - 1e-9)
    if high != math.inf:
        out.append(high if high_open else high + 1e-9)
    if high_open:
        out.append(math.inf)
    return out


@pytest.mark.parametrize("key", sorted(validate.RANGES))
def test_each_float_range_rejects_its_edges(key):
    for value in _just_outside(*validate.RANGES[key]):
        with pytest.raises(ConfigError, match=rf"^{key}: must be "):
            load_config(None, [f"{key}={value!r}".replace("nan", ".nan").replace("inf", ".inf")])


@pytest.mark.parametrize("key", sorted(validate.AT_LEAST) + list(validate.SEEDS))
def test_each_integer_range_rejects_one_below(key):
    low = validate.AT_LEAST.get(key, 0)
    with pytest.raises(ConfigError, match=rf"^{key}: must be an integer"):
        load_config(None, [f"{key}={low - 1}"])


@pytest.mark.parametrize(
    "override",
    ["algorithm.gamma=1", "algorithm.clip_low=0", "rollout.top_p=1", "rollout.eval_temperature=0",
     "algorithm.tis_cap=0", "algorithm.dual_clip=0", "algorithm.dual_clip=3", "rollout.top_k=-1",
     "rollout.top_k=50", "reward.clip=.inf", "algorithm.kl_coef=0", "data.num_eval_prompts=0",
     "trainer.seed=0", "reward.num_workers=0", "algorithm.estimator=reinforce_pp algorithm.gamma=0.99"],
)
def test_values_on_the_edges_are_accepted(override):
    load_config(None, override.split())


def test_the_trainer_and_the_validator_build_the_same_hyperparameters():
    cfg = load_config(None, ["algorithm.kl_use_loss=true", "algorithm.kl_coef=0.05", "algorithm.tis_cap=2",
                             "algorithm.dual_clip=3", "rollout.top_k=5", "rollout.top_p=0.9"])
    assert hyper.advantage_config(cfg).kl_coef == 0.0  # the KL is in the loss, not the reward
    loss = hyper.policy_loss_config(cfg)
    assert (loss.kl_loss_coef, loss.tis_high, loss.dual_clip) == (0.05, 2.0, 3.0)
    train = hyper.sampling_config(cfg, n=4, temperature=1.0)
    greedy = hyper.sampling_config(cfg, n=1, temperature=0.0)
    assert (train.top_k, train.top_p, train.n) == (5, 0.9, 4)
    assert (greedy.top_k, greedy.top_p) == (-1, 1.0)  # greedy ignores top-k/top-p
    off = hyper.policy_loss_config(load_config(None, []))
    assert (off.dual_clip, off.tis_high, off.kl_loss_coef) == (None, None, 0.0)  # 0 = off = None


# ----------------------------------------------------------------------------- plug-ins


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plugin.py"
    path.write_text(text)
    return path


def test_a_plugin_estimator_file_is_loaded_and_accepted(tmp_path):
    f = _write(tmp_path, "def doubled(rewards, group_index, cfg):\n    return 2 * rewards\n")
    cfg = load_config(None, [f"algorithm.estimator={f}:doubled"])
    assert ADVANTAGE_ESTIMATORS.get(cfg.algorithm.estimator).shape_rewards.__name__ == "doubled"
    entry = _write(tmp_path / "..", (
        "from megatron_rpp.algorithms.advantages import AdvantageEstimator, identity_rewards, returns_as_advantages\n"
        "ENTRY = AdvantageEstimator(identity_rewards, returns_as_advantages, 'none', uses_groups=True)\n"))
    with pytest.raises(ConfigError, match="rollout.n_samples_per_prompt: must be >= 2 for the group estimator"):
        load_config(None, [f"algorithm.estimator={entry}:ENTRY", "rollout.n_samples_per_prompt=1"])
    load_config(None, [f"algorithm.estimator={entry}:ENTRY"])


@pytest.mark.parametrize(
    "source,message",
    [
        ("ESTIMATOR = 3\n", "an advantage estimator must be an AdvantageEstimator or a function"),
        ("def two(rewards, cfg):\n    return rewards\n", "must be a function of 3 positional arguments"),
        ("raise ImportError('no module named foo')\n", "failed to import: ImportError: no module named foo"),
        ("def broken(:\n", "failed to import: SyntaxError"),
    ],
    ids=["not-callable", "wrong-arity", "import-error", "syntax-error"],
)
def test_a_bad_plugin_estimator_is_a_config_error(tmp_path, source, message):
    f = _write(tmp_path, source)
    name = source.split()[1].split("(")[0] if source.startswith("def") else "ESTIMATOR"
    with pytest.raises(ConfigError, match=rf"^algorithm.estimator: .*{message}"):
        load_config(None, [f"algorithm.estimator={f}:{name}"])
    with pytest.raises(ConfigError, match="algorithm.estimator: plug-in spec .* does not exist"):
        load_config(None, [f"algorithm.estimator={tmp_path}/missing.py:fn"])


def test_needs_values_comes_from_the_registry_not_the_name():
    """A critic is built for any estimator whose registry entry needs values (gae or a plug-in),
    never for one that does not; the critic's checks run only then."""
    needs = AdvantageEstimator(lambda r, g, c: r, returns_as_advantages, needs_values=True)
    plain = AdvantageEstimator(lambda r, g, c: r, returns_as_advantages)
    ADVANTAGE_ESTIMATORS.register("test_needs_values", needs)
    ADVANTAGE_ESTIMATORS.register("test_plain", plain)
    try:
        for name, critic in (("test_needs_values", True), ("gae", True), ("test_plain", False),
                             ("reinforce_pp", False)):
            cfg = load_config(None, [f"algorithm.estimator={name}"])
            assert hyper.needs_critic(cfg) is critic, name
            bad = [f"algorithm.estimator={name}", "critic.warmup_steps=5", "trainer.steps=5"]
            if critic:
                with pytest.raises(ConfigError, match=r"critic.warmup_steps: must be < trainer.steps \(5\)"):
                    load_config(None, bad)
            else:
                load_config(None, bad)  # no critic: its section is not used
    finally:
        ADVANTAGE_ESTIMATORS.unregister("test_needs_values")
        ADVANTAGE_ESTIMATORS.unregister("test_plain")


def test_critic_folders_are_checked(tmp_path, folders):
    tiny = json.loads((Path(folders["tiny"]) / "config.json").read_text())
    policy = [f"model.hf_dir={folders['tiny']}", "algorithm.estimator=gae"]
    load_config(None, policy)  # from the policy's trunk: LlamaForCausalLM has a score-head counterpart
    with pytest.raises(ConfigError, match="critic.model_dir: .*nowhere' has no config.json"):
        load_config(None, [*policy, f"critic.model_dir={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match="critic.model_dir: .* is a LlamaForCausalLM, not a sequence-classification"):
        load_config(None, [*policy, f"critic.model_dir={folders['tiny']}"])
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({**tiny, "architectures": ["LlamaForSequenceClassification"],
                                                "num_labels": 1}))
    load_config(None, [*policy, f"critic.model_dir={rm}"])
    (rm / "config.json").write_text(json.dumps({**tiny, "architectures": ["LlamaForSequenceClassification"],
                                                "num_labels": 1, "vocab_size": 1000}))
    with pytest.raises(ConfigError, match=r"critic.model_dir: vocab_size 1000 differs from the policy's 512"):
        load_config(None, [*policy, f"critic.model_dir={rm}"])
    (rm / "config.json").write_text(json.dumps({**tiny, "architectures": ["LlamaForSequenceClassification"],
                                                "num_labels": 1}))
    phi3 = tmp_path / "phi3"
    phi3.mkdir()
    (phi3 / "config.json").write_text(json.dumps({**tiny, "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(ConfigError, match="critic.model_dir: empty, so the critic starts from model.hf_dir, but "
                                          "Phi3ForCausalLM has no sequence-classification counterpart"):
        load_config(None, [f"model.hf_dir={phi3}", "algorithm.estimator=gae"])
    load_config(None, [f"model.hf_dir={phi3}", "algorithm.estimator=gae", f"critic.model_dir={rm}"])


def test_reward_plugins_are_resolved_and_type_checked(tmp_path):
    good = ROOT / "examples/reward_fns/short_answer.py"
    load_config(None, [f"reward.function={good}:response_length"])
    f = _write(tmp_path, "SCORE = 1.0\ndef two(prompt, response):\n    return 0.0\n")
    with pytest.raises(ConfigError, match="reward.function: .* is a float, not a function"):
        load_config(None, [f"reward.function={f}:SCORE"])
    with pytest.raises(ConfigError, match=r"reward.function: .* has the signature \(prompt, response\); it must "
                                          r"accept 3 positional arguments"):
        load_config(None, [f"reward.function={f}:two"])
    with pytest.raises(ConfigError, match="reward.function: invalid value 'nope'; allowed values: math_answer"):
        load_config(None, ["reward.function=nope"])
    # Not used (a remote endpoint scores instead): not loaded, not checked.
    load_config(None, ["reward.function=nope", "reward.remote_url=http://127.0.0.1:9/score"])


# ----------------------------------------------------------------------------- layouts from config.json


def test_layouts_that_can_be_built_pass(folders):
    # tiny: 2 heads, 1 KV head (padded to 2 at TP=2), 2 layers, FFN 512
    load_config(None, [f"model.hf_dir={folders['tiny']}", "model.tensor_parallel_size=2", "trainer.num_workers=4",
                       "model.pipeline_parallel_size=2"])
    load_config(None, [f"model.hf_dir={folders['odd_ffn']}"])  # TP=1 splits anything
    load_config(None, ["model.hf_dir=/no/such/folder"])  # not on this machine: checked when the run starts


def test_an_unreadable_config_json_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"model.hf_dir: .*config.json: .*unknown architecture 'GPT2LMHeadModel'"):
        load_config(None, [f"model.hf_dir={tmp_path}"])


def test_a_reward_model_folder_is_checked_against_the_layout(tmp_path, folders):
    rm = tmp_path / "rm"
    rm.mkdir()
    cfg = json.loads((Path(folders["odd_ffn"]) / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"],
                                                "num_labels": 1}))
    with pytest.raises(ConfigError, match=r"model.tensor_parallel_size: 2 must divide intermediate_size \(255\) "
                                          r"of .*rm/config.json \(reward.model_dir\)"):
        load_config(None, [f"model.hf_dir={folders['tiny']}", f"reward.model_dir={rm}",
                           "model.tensor_parallel_size=2", "trainer.num_workers=2"])


def test_load_config_imports_nothing_heavy(folders):
    code = (
        "import sys, json\n"
        "from megatron_rpp.config import load_config\n"
        f"load_config({str(ROOT / 'examples/configs/cpu_demo.yaml')!r}, ['model.hf_dir={folders['tiny']}',"
        f" 'reward.function={ROOT}/examples/reward_fns/short_answer.py:response_length'])\n"
        "heavy = ('megatron', 'vllm', 'ray', 'transformers', 'triton', 'reasoning_gym')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
