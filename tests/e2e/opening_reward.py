"""Test reward for the PPO critic check (tests/e2e/test_ppo_cli.py): 1 when the reply opens with a number.

``reward.function=tests/e2e/opening_reward.py:opens_with_number``. The system prompt of the
arithmetic task asks for only the final number; SmolLM2-135M-Instruct at temperature 1 opens with a
digit about a third of the time ("10 - 3 = 7", "48 + 23 = 71 ...") and otherwise with prose ("To
calculate 31 - 89, ..."). The reward is decided by the first ``OPENING`` characters, so it varies
across samples, and every later state of the response (which holds that opening) determines it:
a return a value model can learn from its inputs, unlike the response's length at a 16-token cap.
"""
OPENING = 12
"""Characters of the reply that decide the reward (about its first three tokens)."""


def opens_with_number(prompt: str, response: str, sample: dict) -> float:
    return 1.0 if any(c.isdigit() for c in response[:OPENING]) else 0.0
