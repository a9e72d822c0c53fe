"""Example user reward: ``reward.function=examples/reward_fns/short_answer.py:reward``.

Signature: ``fn(prompt: str, response: str, sample: dict) -> float``. This one prefers
responses that end with a number within 20 characters of the end (a concise final
answer) — a shaping reward that is easy to see move in a short run.
"""
import re


def reward(prompt: str, response: str, sample: dict) -> float:
    tail = response.strip()[-20:]
    return 1.0 if re.search(r"-?\d+(\.\d+)?\s*\.?$", tail) else 0.0


def response_length(prompt: str, response: str, sample: dict) -> float:
    """Longer responses score higher (up to 1): a reward any random model can move."""
    return min(len(response), 200) / 200.0
