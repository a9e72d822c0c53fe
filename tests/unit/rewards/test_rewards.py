"""Rule rewards and the scorer: extraction, numeric checks, loud failures."""
import math

import pytest

from megatron_rpp.rewards.rules import extract_answer, math_answer, parse_number, reasoning_gym_score
from megatron_rpp.rewards.scorer import RewardError, RewardScorer


@pytest.mark.parametrize(
    "response,expected",
    [
        ("so the answer is <answer> 42 </answer>", "42"),
        ("we get \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("work...\n#### 1,234\n", "1,234"),
        ("3 + 4 = 7, then 7 * 2 = 14.", "14"),
        ("no digits here", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_math_answer_numeric_and_gsm8k_reference():
    assert math_answer("", "so 1,234.", {"answer": "1234"}) == 1.0
    assert math_answer("", "it is 7/2", {"answer": "3.5"}) == 1.0
    assert math_answer("", "it is 3", {"answer": "Janet... #### 4"}) == 0.0
    assert math_answer("", "#### 4", {"answer": "Janet... #### 4"}) == 1.0
    assert math_answer("", "nothing", {"answer": "4"}) == 0.0
    assert parse_number("$12") == 12.0 and parse_number("x") is None


def test_reasoning_gym_score_uses_the_task_checker():
    import reasoning_gym

    entry = next(iter(reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)))
    sample = {"entry": entry}
    assert reasoning_gym_score("", f"The result is {entry['answer']}", sample) == 1.0
    assert reasoning_gym_score("", "The result is 123456789", sample) == 0.0


def test_failures_name_the_sample(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def nan(p, r, s):\n    return float('nan')\n\ndef ok(p, r, s):\n    return len(r)\n")
    with pytest.raises(RewardError, match=r"sample 1: prompt='q2' response='r2'.*ZeroDivisionError"):
        _raise_on_second(f)
    with pytest.raises(RewardError, match="not finite"):
        RewardScorer(f"{f}:nan")(["q"], ["r"], [{}])
    assert RewardScorer(f"{f}:ok", num_workers=2)(["a", "b", "c"], ["x", "yy", "zzz"], [{}, {}, {}]) == [1.0, 2.0, 3.0]


def _raise_on_second(f):
    f2 = f.parent / "r2.py"
    f2.write_text("def fn(p, r, s):\n    if r == 'r2':\n        raise ZeroDivisionError('bad')\n    return 1.0\n")
    RewardScorer(f"{f2}:fn")(["q1", "q2"], ["r1", "r2"], [{}, {}])


def test_unknown_reward_lists_registered():
    with pytest.raises(KeyError, match="math_answer"):
        RewardScorer("no_such_reward")
    assert math.isfinite(RewardScorer("math_answer")(["q"], ["4"], [{"answer": "4"}])[0])
