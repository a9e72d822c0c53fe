"""Rule-based rewards: answer extraction and checking. Pure Python (runs in worker processes).

Every reward has the signature ``fn(prompt: str, response: str, sample: dict) -> float``.
"""
from __future__ import annotations

import math
import re

from megatron_rpp.algorithms.registry import Registry

REWARDS: Registry = Registry("reward function")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer of a response: ``<answer>..</answer>``, ``\\boxed{}``, ``#### x``, else the last number."""
    m = re.findall(r"<answer>(.*?)</answer>", response, flags=re.S)
    if m:
        return m[-1].strip()
    boxed = _boxed(response)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"####\s*([^\n]+)", response)
    if m:
        return m[-1].strip()
    nums = _NUMBER.findall(response)
    return nums[-1] if nums else None


def parse_number(text: str) -> float | None:
    """A number from an answer string ("1,234", "-3.5", "7/2", "$12"); None if there is none."""
    nums = _NUMBER.findall(text.replace("$", ""))
    if not nums:
        return None
    s = nums[-1].replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b) if float(b) != 0 else None
        return float(s)
    except ValueError:
        return None


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


@REWARDS.register("math_answer")
def math_answer(prompt: str, response: str, sample: dict) -> float:
    """1.0 when the response's final answer equals ``sample["answer"]`` numerically, else 0.0.

    The reference may itself be a worked solution ending in ``#### x`` (GSM8K style).
    """
    if "answer" not in sample:
        raise KeyError("math_answer needs an 'answer' field in the sample")
    ref_text = str(sample["answer"])
    ref_answer = extract_answer(ref_text) if "####" in ref_text or "\\boxed" in ref_text else ref_text
    ref = parse_number(ref_answer or "")
    got = extract_answer(response)
    if got is None:
        return 0.0
    if ref is None:  # non-numeric reference: exact string match after normalisation
        return float(got.strip().lower() == ref_text.strip().lower())
    val = parse_number(got)
    return float(val is not None and numbers_equal(val, ref))


@REWARDS.register("reasoning_gym")
def reasoning_gym_score(prompt: str, response: str, sample: dict) -> float:
    """reasoning-gym's own ``score_answer`` on the extracted final answer."""
    import reasoning_gym

    entry = sample["entry"]
    score = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
    answer = extract_answer(response)
    return float(score(answer, entry)) if answer is not None else 0.0
