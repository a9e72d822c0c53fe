"""REINFORCE++ and its baselines side by side: the same task, model, data order, sampling budget and
learning rate; only the advantage estimator (and where its KL goes) differs; >= 3 seeds each.

    python benchmarks/compare_estimators.py            # the full study (both scenarios, 30 runs: ~2 h)
    python benchmarks/compare_estimators.py --quick    # every estimator once, tiny budget (<= 10 min)

Estimators (``ESTIMATORS``): REINFORCE++ (k1 KL in the reward), REINFORCE++-baseline (group-mean
baseline, then global whitening; k1 in the reward), GRPO (group-normalised, k3 KL loss), RLOO
(leave-one-out baseline; k1 in the reward), PPO (GAE with a critic started from the policy's trunk,
zero value head; k1 in the reward). One β for every estimator (in the reward or as the loss weight).

Scenarios (``SCENARIOS``), both on SmolLM2-135M-Instruct and reasoning-gym two-term arithmetic
prompts (``examples/configs/cpu_demo.yaml``'s data, model and learning rate; :data:`STUDY_BUDGET`'s
4 prompts x 4 samples per step):

- ``rule``: reasoning-gym's answer checker (1 = correct);
- ``bt``: a Bradley-Terry reward model made here, offline (:func:`build_bt_reward_model`): a tiny
  ``LlamaForSequenceClassification`` trained on synthetic preference pairs of answers
  (terse ≻ verbose ≻ rambling, correct ≻ wrong), served by the workers like any ``reward.model_dir``.
  Its held-out pairwise accuracy is reported (per kind of pair: what it learned, and what not).

Every run is a ``megatron-rpp train`` subprocess with one in-process worker (the only rank), so its
peak RSS (``os.wait4``) is the peak memory per rank. The held-out evaluation (greedy, the scenario's
reward) runs at step 0, every ``eval_interval`` and at the end. KL is ``kl/policy_ref_k3``: the k3
estimate of KL(π ‖ π_ref) per response token, the same measure for every estimator.

Writes ``benchmarks/results/compare_estimators.json`` (``--quick``: ``compare_estimators_quick.json``),
one PNG per scenario and plot next to it, and prints a table per scenario.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "examples" / "configs" / "cpu_demo.yaml"
RESULTS = ROOT / "benchmarks" / "results"

#: label -> config overrides (the only thing that differs between the runs of a scenario).
ESTIMATORS = {
    "REINFORCE++": ["algorithm.estimator=reinforce_pp", "algorithm.kl_estimator=k1"],
    "REINFORCE++-baseline": ["algorithm.estimator=reinforce_pp_baseline", "algorithm.kl_estimator=k1"],
    "GRPO": ["algorithm.estimator=grpo", "algorithm.kl_use_loss=true", "algorithm.kl_loss_estimator=k3"],
    "RLOO": ["algorithm.estimator=rloo", "algorithm.kl_estimator=k1"],
    "PPO": ["algorithm.estimator=gae", "algorithm.kl_estimator=k1", "algorithm.lam=1.0", "critic.lr=1e-4"],
}
#: Every run of the study: one in-process worker, rule rewards scored in the controller, no export.
COMMON = ["trainer.num_workers=1", "reward.num_workers=0", "trainer.export_hf=false", "trainer.progress=false"]
#: The study's sampling budget (sized so the whole study fits 2 hours on 2 cores: RESULTS.md):
#: 4 prompts x 4 samples per step, two optimizer steps of 8 sequences per rollout batch (four
#: optimizer steps of 4 were tried: each optimizer step costs ~3.5 s on this CPU, too slow to fit).
STUDY_BUDGET = ["rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
                "trainer.train_batch_size=8", "trainer.micro_batch_size=8"]
#: --quick: the same runs with a tiny sampling budget (plumbing and a duration estimate, not results).
QUICK_BUDGET = ["rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2",
                "trainer.train_batch_size=4", "trainer.micro_batch_size=4", "data.num_eval_prompts=16"]


@dataclass(frozen=True)
class Scenario:
    title: str
    overrides: list[str]
    steps: int
    eval_interval: int
    quick_steps: int = 2
    rm_pairs: int = 0  # > 0: a Bradley-Terry reward model is trained first on this many preference pairs


SCENARIOS = {
    "rule": Scenario("rule reward (reasoning-gym answer check)", ["algorithm.kl_coef=0.001"], steps=4,
                     eval_interval=2),
    "bt": Scenario("Bradley-Terry reward model (synthetic preferences)", ["algorithm.kl_coef=0.01"], steps=3,
                   eval_interval=2, rm_pairs=3000),
}
SEEDS = (1, 2, 3)
SCORE_PHASES = ("reward", "old_log_probs", "ref_log_probs", "values")


# ----------------------------------------------------------------------------- one run


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower())


def run_one(scenario: str, label: str, seed: int, overrides: list[str], out: Path, reuse: bool = True,
            recorded: dict | None = None) -> dict:
    """One ``megatron-rpp train`` subprocess; its metrics, wall/CPU time and peak RSS.

    A finished run leaves ``summary.json`` in ``out``; with ``reuse`` a later study with the same
    command takes it from there instead of training again (a study interrupted after N runs
    resumes at run N + 1; a changed command, e.g. another budget, trains again). ``recorded`` maps
    a command (JSON) to a run already in the study's JSON: the same reuse when the work dir is gone."""
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", "--config", str(BASE_CONFIG), *COMMON, *overrides,
           *ESTIMATORS[label], f"trainer.seed={seed}", f"trainer.output_dir={out}"]
    done = out / "summary.json"
    if reuse and done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("command") == cmd[3:]:
            return {**summary, "reused": True}
    if reuse and recorded and json.dumps(cmd[3:]) in recorded:
        return {**recorded[json.dumps(cmd[3:])], "reused": True}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(out / "console.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS and CPU time
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{scenario}/{label}/seed {seed} failed ({proc.returncode}):\n"
                           + (out / "console.log").read_text()[-4000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = summarize_run(scenario, label, seed, rows, wall=wall, cpu=usage.ru_utime + usage.ru_stime,
                            peak_rss_mib=usage.ru_maxrss / 1024, load_average=os.getloadavg(), command=cmd[3:])
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary))
    tmp.replace(done)  # atomic: a killed study never leaves a half summary to be reused
    return summary


def curves_equal(a: dict, b: dict) -> dict:
    """Whether two runs of one (estimator, seed) pair gave the same curves: the largest absolute
    difference of every per-step value (train reward, KL, response length; eval reward)."""
    diffs = [abs(x[k] - y[k]) for x, y in zip(a["train"], b["train"]) for k in ("reward", "kl", "response_length")]
    diffs += [abs(x["reward"] - y["reward"]) for x, y in zip(a["eval"], b["eval"])]
    same_len = len(a["train"]) == len(b["train"]) and len(a["eval"]) == len(b["eval"])
    worst = max(diffs, default=math.nan)
    return {"estimator": a["estimator"], "seed": a["seed"], "max_abs_diff": worst, "identical": same_len and worst == 0.0}


def summarize_run(scenario: str, label: str, seed: int, rows: list[dict], **extra) -> dict:
    """The curves and per-step costs of one run from its metrics.jsonl rows."""
    train = [r for r in rows if "reward/mean" in r]
    evals = [{"step": r["step"], "reward": r["eval/reward_mean"], "response_length": r["eval/response_length_mean"],
              "kl": 0.0 if r["step"] == 0 else r.get("kl/policy_ref_k3", math.nan)}
             for r in rows if "eval/reward_mean" in r]

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in train) / max(1, len(train))

    timing = {"generate": mean("timing/generate"), "score": sum(mean(f"timing/{p}") for p in SCORE_PHASES),
              "train": mean("timing/train"), "step": mean("timing/step") - mean("timing/eval")}  # without evaluation
    timing["other"] = timing["step"] - timing["generate"] - timing["score"] - timing["train"]
    return {
        "scenario": scenario, "estimator": label, "seed": seed, "eval": evals,
        "train": [{"step": r["step"], "reward": r["reward/mean"], "kl": r.get("kl/policy_ref_k3", math.nan),
                   "response_length": r["response_length/mean"],
                   **({"explained_variance": r["critic/explained_variance"]} if "critic/explained_variance" in r
                      else {})} for r in train],
        "seconds_per_step": timing, "eval_seconds": mean("timing/eval") * len(train) / max(1, len(evals) - 1),
        "tokens_per_step": mean("tokens/train_real"), **extra,
    }


# ----------------------------------------------------------------------------- the Bradley-Terry reward model


def preference_responses(question: str, answer: str, rng: random.Random) -> list[tuple[str, float]]:
    """Synthetic answers to one arithmetic question with their hidden preference score
    g = 1·correct + 0.5·terse − 0.5·rambling: terse ≻ verbose ≻ rambling, correct ≻ wrong."""
    value = int(answer)
    wrong = str(value + rng.choice([-10, -2, -1, 1, 2, 10]))
    expr = question.removeprefix("Calculate ").rstrip(".")
    return [
        (answer, 1.5), (wrong, 0.5),
        (rng.choice([f"The answer is {answer}.", f"{expr} = {answer}", f"{answer} is the result."]), 1.0),
        (rng.choice([f"The answer is {wrong}.", f"{expr} = {wrong}", f"{wrong} is the result."]), 0.0),
        (rng.choice(["Sure! Let me work through this calculation step by step for you.",
                     "I think the question asks for a calculation, which I can explain.",
                     f"To calculate {expr} we need to add or subtract the numbers carefully."]), -0.5),
    ]


def build_bt_reward_model(out: Path, pairs: int, seed: int = 0, reuse: bool = True) -> dict:
    """Train a tiny Bradley-Terry RM on synthetic preference pairs; save it as a HF
    ``LlamaForSequenceClassification`` folder (SmolLM2's tokenizer) at ``out``. Returns its report
    (also kept as ``out/bt_report.json``: with ``reuse`` a resumed study takes the same RM)."""
    kept = out / "bt_report.json"
    if reuse and kept.is_file():
        report = json.loads(kept.read_text())
        if report.get("requested_pairs") == pairs and report.get("seed") == seed:
            return report
    import torch
    import transformers

    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.config import load_config
    from megatron_rpp.data.prompts import reasoning_gym_rows, tokenize_prompts

    t0 = time.perf_counter()
    tok_dir = materialize_smollm2()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = load_config(BASE_CONFIG, []).data
    # Questions with another seed than the RL prompts: the RM never saw the study's prompts.
    rows = reasoning_gym_rows(data.task, max(64, pairs // 4), seed + 1000, data.task_config)
    prompts, _ = tokenize_prompts(rows, tokenizer, data, 10_000)
    rng = random.Random(seed)
    examples = []  # (chosen ids, rejected ids, kind)
    for p in prompts:
        answers = preference_responses(p.text, p.sample["answer"], rng)
        ids = [(p.token_ids + tokenizer.encode(text, add_special_tokens=False) + [eos], g) for text, g in answers]
        for i in range(len(ids)):
            for j in range(len(ids)):
                if ids[i][1] > ids[j][1]:  # answers 0/1 (terse) and 2/3 (verbose) differ only in correctness
                    kind = "correct vs wrong, same form" if {i, j} in ({0, 1}, {2, 3}) else "form"
                    examples.append((ids[i][0], ids[j][0], kind))
    rng.shuffle(examples)
    held_out, train = examples[: len(examples) // 8], examples[len(examples) // 8:][:pairs]

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=512, num_labels=1, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, tie_word_embeddings=False,
                                   architectures=["LlamaForSequenceClassification"])  # SmolLM2's vocabulary
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg).float()

    def scores(seqs: list[list[int]]) -> torch.Tensor:
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        hidden = model.model(input_ids=ids).last_hidden_state  # right padding + causal: no pad reaches a real token
        last = torch.tensor([len(s) - 1 for s in seqs])
        return model.score(hidden)[torch.arange(len(seqs)), last, 0]

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch, losses = 32, []
    for epoch in range(2):
        for k in range(0, len(train), batch):
            chunk = train[k: k + batch]
            s = scores([c for c, _, _ in chunk] + [r for _, r, _ in chunk])
            loss = -torch.nn.functional.logsigmoid(s[: len(chunk)] - s[len(chunk):]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        s = torch.cat([scores([c for c, _, _ in held_out[k: k + 64]] + [r for _, r, _ in held_out[k: k + 64]])
                       .view(2, -1).T for k in range(0, len(held_out), 64)])  # [pairs, 2]
        won = (s[:, 0] > s[:, 1]).tolist()
        all_scores = s.flatten()
    accuracy = {kind: sum(w for w, (_, _, k) in zip(won, held_out) if k == kind)
                / max(1, sum(k == kind for _, _, k in held_out)) for kind in sorted({k for _, _, k in held_out})}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, tmp / f)
    report = {"dir": str(out), "requested_pairs": pairs, "seed": seed, "train_pairs": len(train),
              "held_out_pairs": len(held_out), "held_out_accuracy": {"all": sum(won) / len(won), **accuracy},
              "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
              "score_mean": float(all_scores.mean()), "score_std": float(all_scores.std()),
              "seconds": time.perf_counter() - t0}
    (tmp / "bt_report.json").write_text(json.dumps(report))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def same_reward_model(rm: dict, before: dict | None, rtol: float = 1e-4) -> dict:
    """Resuming a study whose work dir (and so its RM) is gone: the RM is rebuilt from the same pairs
    and seed; on another CPU its weights differ by float rounding. Keep the recorded score
    normalisation (the finished runs' commands name it) when the rebuilt RM's score mean and std
    agree with it to ``rtol``; otherwise the runs would not be comparable: stop, name both."""
    if before is None or (before["requested_pairs"], before["seed"], before["dir"]) != (
            rm["requested_pairs"], rm["seed"], rm["dir"]):
        return rm
    drift = max(abs(rm[k] - before[k]) / max(abs(before[k]), 1e-12) for k in ("score_mean", "score_std"))
    if drift > rtol:
        raise SystemExit(f"the rebuilt reward model scores mean {rm['score_mean']:.6g} / std {rm['score_std']:.6g}, "
                         f"the recorded study's {before['score_mean']:.6g} / {before['score_std']:.6g} (relative "
                         f"difference {drift:.1e} > {rtol:g}): its runs are not comparable; start again with --fresh")
    return {**rm, "score_mean": before["score_mean"], "score_std": before["score_std"],
            "rebuilt_score_drift": drift}


# ----------------------------------------------------------------------------- aggregation, table, plots


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs)}


def aggregate(runs: list[dict]) -> dict:
    """Per estimator: the table's columns over its seeds (mean, std, n)."""
    out = {}
    for label in ESTIMATORS:
        mine = [r for r in runs if r["estimator"] == label]
        if not mine:
            continue
        final = [r["eval"][-1]["reward"] for r in mine]
        gain = [(r["eval"][-1]["reward"] - r["eval"][0]["reward"]) / r["eval"][-1]["kl"]
                if r["eval"][-1]["kl"] > 0 else math.nan for r in mine]
        phases = {k: _mean_std([r["seconds_per_step"][k] for r in mine]) for k in mine[0]["seconds_per_step"]}
        out[label] = {
            "eval_reward_start": _mean_std([r["eval"][0]["reward"] for r in mine]),
            "eval_reward_final": _mean_std(final), "eval_reward_best": _mean_std([max(e["reward"] for e in r["eval"])
                                                                                   for r in mine]),
            "kl_final": _mean_std([r["eval"][-1]["kl"] for r in mine]), "reward_gain_per_kl": _mean_std(gain),
            "response_length_start": _mean_std([r["train"][0]["response_length"] for r in mine]),
            "response_length_end": _mean_std([r["train"][-1]["response_length"] for r in mine]),
            "seconds_per_step": phases, "peak_rss_mib": _mean_std([r["peak_rss_mib"] for r in mine]),
            "wall_seconds": _mean_std([r["wall"] for r in mine]),
            **({"explained_variance_final": _mean_std([r["train"][-1]["explained_variance"] for r in mine])}
               if "explained_variance" in mine[0]["train"][-1] else {}),
        }
    return out


def _pm(s: dict, digits: int = 3) -> str:
    return "n/a" if s["n"] == 0 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table(scenario: str, agg: dict) -> str:
    head = ("| estimator | final eval reward | best eval reward | KL to ref (final) | Δreward / KL | "
            "length start → end | s/step gen / score / train | peak RSS / rank |")
    lines = [f"**{SCENARIOS[scenario].title}**", "", head, "|" + " --- |" * 8]
    for label, a in agg.items():
        t = a["seconds_per_step"]
        lines.append(
            f"| {label} | {_pm(a['eval_reward_final'])} | {_pm(a['eval_reward_best'])} | {_pm(a['kl_final'], 4)} | "
            f"{_pm(a['reward_gain_per_kl'], 1)} | {a['response_length_start']['mean']:.1f} → "
            f"{a['response_length_end']['mean']:.1f} | {t['generate']['mean']:.1f} / {t['score']['mean']:.1f} / "
            f"{t['train']['mean']:.1f} | {a['peak_rss_mib']['mean'] / 1024:.2f} GiB |")
    return "\n".join(lines)


def plot(scenario: str, runs: list[dict], stem: Path) -> list[str]:
    """Eval reward vs step and vs KL, one line per estimator (mean over seeds, ± std shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, xlabel, suffix in (("step", "training step", "steps"), ("kl", "KL(π ‖ π_ref) per token (k3)", "kl")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in ESTIMATORS:
            mine = [r for r in runs if r["estimator"] == label]
            if not mine:
                continue
            n = min(len(r["eval"]) for r in mine)
            xs = [sum(r["eval"][i][x_key] for r in mine) / len(mine) for i in range(n)]
            ys = [[r["eval"][i]["reward"] for r in mine] for i in range(n)]
            mean = [sum(y) / len(y) for y in ys]
            sd = [_mean_std(y)["std"] for y in ys]
            (line,) = ax.plot(xs, mean, marker="o", label=label)
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out eval reward (greedy)")
        ax.set_title(f"{SCENARIOS[scenario].title}\n{len({r['seed'] for r in runs})} seed(s); mean ± std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{scenario}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    return written


#: The full budget per step (:data:`STUDY_BUDGET`, 4 prompts x 4 samples, <= 32 new tokens): ~955
#: tokens trained (``tokens/train_real``, prompts + responses; the full study's mean: 942 rule,
#: 972 bt) and evaluation of 64 prompts with ~2x the quick run's response tokens, i.e. ~8x its
#: evaluation work.
FULL_TOKENS_PER_STEP, FULL_EVAL_FACTOR = 955, 8.0


def eval_steps(steps: int, interval: int) -> list[int]:
    """The steps a run evaluates at: 0, every ``interval`` and the last (``trainer.eval_interval``)."""
    return sorted({*range(0, steps + 1, interval), steps}) if interval > 0 else [0, steps]


def estimate_full(runs: list[dict]) -> float | None:
    """Seconds the full study would take at the speed these (quick) runs saw: per (scenario,
    estimator) its measured start-up, step time scaled by the tokens trained per step, and
    evaluation time scaled by :data:`FULL_EVAL_FACTOR`; times the full study's seeds."""
    total = 0.0
    for name, sc in SCENARIOS.items():
        for label in ESTIMATORS:
            mine = [r for r in runs if r["scenario"] == name and r["estimator"] == label]
            if not mine:
                return None
            r = mine[0]
            steps, per_step = len(r["train"]), r["seconds_per_step"]["step"]
            startup = r["wall"] - steps * per_step - len(r["eval"]) * r["eval_seconds"]
            full_step = per_step * FULL_TOKENS_PER_STEP / max(r["tokens_per_step"], 1.0)
            full_evals = len(eval_steps(sc.steps, sc.eval_interval))
            total += len(SEEDS) * (startup + sc.steps * full_step + full_evals * r["eval_seconds"] * FULL_EVAL_FACTOR)
    return total


# ----------------------------------------------------------------------------- main


@dataclass
class Study:
    quick: bool
    scenarios: list[str]
    estimators: list[str]
    seeds: list[int]
    work_dir: Path
    extra: list[str] = field(default_factory=list)
    steps: int | None = None

    def overrides(self, name: str) -> list[str]:
        sc = SCENARIOS[name]
        steps = self.steps or (sc.quick_steps if self.quick else sc.steps)
        interval = 0 if self.quick else sc.eval_interval
        return [*sc.overrides, *(QUICK_BUDGET if self.quick else STUDY_BUDGET), f"trainer.steps={steps}",
                f"trainer.eval_interval={interval}", *self.extra]


def write_report(out: Path, report: dict) -> None:
    """Write the study's JSON atomically (``complete`` stays false until the last run is in)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"complete": False, **report}, indent=1))
    tmp.replace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budget, 2 steps, one seed (<= 10 min)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated labels")
    ap.add_argument("--seeds", default=None, help="comma-separated trainer seeds (default 1,2,3; --quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="override every scenario's step count")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compare_estimators[_quick].json)")
    ap.add_argument("--work-dir", default="/tmp/megatron_rpp_compare_estimators")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--fresh", action="store_true",
                    help="train every run again (default: reuse a finished run's summary.json in --work-dir, "
                         "or its record in the existing --out JSON, when its command is the same)")
    ap.add_argument("--check-seed", action="store_true",
                    help="at the end, re-run the first (estimator, seed) pair of each scenario in a fresh "
                         "directory and compare its curves with the first run (the study's reproducibility)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([1] if args.quick else list(SEEDS))
    study = Study(args.quick, args.scenarios.split(","), args.estimators.split(","), seeds, Path(args.work_dir),
                  list(args.overrides), args.steps)
    out = Path(args.out) if args.out else RESULTS / f"compare_estimators{'_quick' if args.quick else ''}.json"
    t_start, load_start = time.perf_counter(), os.getloadavg()
    report: dict = {"quick": args.quick, "base_config": str(BASE_CONFIG.relative_to(ROOT)), "common": COMMON,
                    "estimators": {k: ESTIMATORS[k] for k in study.estimators}, "seeds": seeds, "scenarios": {},
                    "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                "load_average_start": load_start}}
    recorded: dict[str, dict] = {}  # command -> run, from a previous (partial) study's JSON at --out
    recorded_rm: dict[str, dict] = {}  # scenario -> its reward model's report, from the same JSON
    if out.is_file() and not args.fresh:
        for name, entry in json.loads(out.read_text()).get("scenarios", {}).items():
            recorded.update({json.dumps(r["command"]): r for r in entry.get("runs", [])})
            if "reward_model" in entry:
                recorded_rm[name] = entry["reward_model"]
    all_runs = []
    for name in study.scenarios:
        sc, overrides = SCENARIOS[name], study.overrides(name)
        entry: dict = {"title": sc.title, "overrides": overrides}
        if sc.rm_pairs:
            rm = build_bt_reward_model(study.work_dir / "bt_reward_model", sc.rm_pairs // (10 if args.quick else 1),
                                       reuse=not args.fresh)
            print(f"[{name}] Bradley-Terry RM: held-out pairwise accuracy {json.dumps(rm['held_out_accuracy'])}, "
                  f"{rm['seconds']:.0f} s")
            rm = same_reward_model(rm, recorded_rm.get(name))
            entry["reward_model"] = rm
            overrides = [*overrides, f"reward.model_dir={rm['dir']}", f"reward.model_mean={rm['score_mean']:.6g}",
                         f"reward.model_std={rm['score_std']:.6g}"]
            entry["overrides"] = overrides
        runs = []
        report["scenarios"][name] = entry
        for seed in seeds:  # seed-major: a partial study still has every estimator at the first seeds
            for label in study.estimators:
                run_dir = study.work_dir / name / f"{slug(label)}_seed{seed}"
                runs.append(run_one(name, label, seed, overrides, run_dir, reuse=not args.fresh, recorded=recorded))
                r = runs[-1]
                print(f"[{name}] {label:<21} seed {seed}: eval {r['eval'][0]['reward']:.3f} -> "
                      f"{r['eval'][-1]['reward']:.3f}, KL {r['eval'][-1]['kl']:.4f}, {r['wall']:.0f} s, "
                      f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB" + (" (reused)" if r.get("reused") else ""),
                      flush=True)
                entry["runs"], entry["aggregate"] = runs, aggregate(runs)
                write_report(out, report)  # after every run: a partial study is on disk
        if args.check_seed:
            first = runs[0]
            again = run_one(name, first["estimator"], first["seed"], overrides,
                            study.work_dir / name / f"{slug(first['estimator'])}_seed{first['seed']}_again", reuse=False)
            entry["reproducibility"] = curves_equal(first, again)
            print(f"[{name}] re-run of {first['estimator']} seed {first['seed']}: {entry['reproducibility']}", flush=True)
        if not args.no_plots:
            entry["plots"] = plot(name, runs, out.with_suffix(""))
        all_runs += runs
    report["machine"]["load_average_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t_start
    report["estimated_full_study_seconds"] = estimate_full(all_runs) if args.quick else None
    report["complete"] = True
    write_report(out, report)
    for name, entry in report["scenarios"].items():
        print("\n" + table(name, entry["aggregate"]))
    print(f"\nwall time {report['wall_seconds'] / 60:.1f} min (load average {load_start[0]:.1f} at the start)"
          + (f"; estimated full study: {report['estimated_full_study_seconds'] / 60:.0f} min at this machine's speed"
             if report["estimated_full_study_seconds"] else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
