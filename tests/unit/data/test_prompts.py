"""Prompt data: malformed rows name file and line; long prompts are skipped and counted; resumable order."""
import json

import pytest

from megatron_rpp.config.schema import DataConfig
from megatron_rpp.data.prompts import DatasetError, Prompt, PromptStream, load_rows, read_jsonl, tokenize_prompts


def test_malformed_jsonl_reports_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a"}) + "\n\n" + "{not json\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:3: invalid JSON"):
        read_jsonl(p, "prompt")
    p.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:2: field 'prompt'"):
        read_jsonl(p, "prompt")


def test_jsonl_split_and_extra_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"q": f"question {i}", "answer": str(i)}) + "\n" for i in range(10)))
    train, evals = load_rows(DataConfig(source="jsonl", path=str(p), prompt_field="q", num_eval_prompts=2))
    assert len(train) == 8 and len(evals) == 2 and train[0]["answer"] == "2"


class _Tok:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": list(range(len(text.split())))}


def test_long_prompts_skipped_and_counted():
    rows = [{"prompt": "a b c"}, {"prompt": "a b c d e f g"}]
    prompts, skipped = tokenize_prompts(rows, _Tok(), DataConfig(), max_prompt_length=4)
    assert [p.text for p in prompts] == ["a b c"] and skipped == 1


def test_stream_resumes_exactly():
    prompts = [Prompt(str(i), [i], {}) for i in range(7)]
    a = PromptStream(prompts, seed=1)
    first = [p.text for p in a.next_batch(5)]
    state = a.state_dict()
    rest = [p.text for p in a.next_batch(6)]  # crosses an epoch boundary
    b = PromptStream(prompts, seed=1)
    b.load_state_dict(state)
    assert [p.text for p in b.next_batch(6)] == rest
    assert sorted(first + rest[:2]) == [str(i) for i in range(7)]  # epoch 0 is a permutation


def test_reasoning_gym_rows():
    train, evals = load_rows(DataConfig(task="basic_arithmetic", num_train_prompts=5, num_eval_prompts=3))
    assert len(train) == 5 and len(evals) == 3 and "entry" in train[0]
