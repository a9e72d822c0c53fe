"""A reward that varies across prompts whatever a tiny random model answers (its greedy answers can
all be the same text): the prompt's length in characters, scaled to [0, 1). Used where a test needs
non-zero advantages from greedy (``rollout.top_k=1``) rollouts."""


def prompt_length(prompt: str, response: str, sample: dict) -> float:
    return (len(prompt) % 50) / 50.0
