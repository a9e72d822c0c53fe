"""RolloutBatch: construction, packing for the model, slicing without re-padding, micro-batching.
Expected values are worked out by hand in the comments."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.data.rollout_batch import RolloutBatch, micro_batch_indices, pad_right


def _batch() -> RolloutBatch:
    # prompts [5, 6] / [7] / [8, 9, 10]; responses [11, 12, 13] / [14] / [] (empty)
    return RolloutBatch.from_sequences([[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14], []],
                                       group_index=[0, 0, 1],
                                       rollout_log_probs=[torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0]),
                                                          torch.tensor([])])


def test_pad_right_pads_and_checks_width():
    assert pad_right([[1, 2], [3]]).tolist() == [[1, 2], [3, 0]]
    assert pad_right([[1], []], width=3, value=-1).tolist() == [[1, -1, -1], [-1, -1, -1]]
    assert pad_right([[], []]).shape == (2, 1)  # at least one column
    # tensor rows keep their dtype and trailing dims: [2, 2] and [1, 2] -> [2, 2, 2]
    out = pad_right([torch.ones(2, 2), torch.full((1, 2), 3.0)])
    assert out.dtype == torch.float32 and out.tolist() == [[[1, 1], [1, 1]], [[3, 3], [0, 0]]]
    with pytest.raises(ValueError, match="does not fit"):
        pad_right([[1, 2, 3]], width=2)


def test_from_sequences_fields():
    b = _batch()
    assert b.prompt_ids.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]]
    assert b.prompt_lengths.tolist() == [2, 1, 3]
    assert b.response_ids.tolist() == [[11, 12, 13], [14, 0, 0], [0, 0, 0]]
    assert b.response_mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert b.rollout_log_probs.tolist() == [[-1, -2, -3], [-4, 0, 0], [0, 0, 0]]
    assert b.response_lengths.tolist() == [3, 1, 0] and b.sequence_lengths.tolist() == [5, 2, 3]
    assert b.num_response_tokens == 4 and len(b) == 3 and b.response_list(1) == [14]


def test_model_inputs_packs_prompt_then_response():
    ids, resp_index = _batch().model_inputs()
    # S = longest prompt + response = 5
    assert ids.tolist() == [[5, 6, 11, 12, 13], [7, 14, 0, 0, 0], [8, 9, 10, 0, 0]]
    # response token t of row b is predicted at position p_b + t - 1: row 0 -> 1, 2, 3; row 1 -> 0; masked -> 0
    assert resp_index.tolist() == [[1, 2, 3], [0, 0, 0], [0, 0, 0]]
    # the predicted tokens are exactly the responses
    b = _batch()
    picked = torch.where(b.response_mask, ids.gather(1, resp_index + 1), 0)
    assert torch.equal(picked, b.response_ids)


def test_select_split_trim_cat():
    b = _batch()
    s = b.select([2, 0])
    assert s.group_index.tolist() == [1, 0] and s.response_ids.shape == (2, 3)  # same widths
    t = b.select([1]).trimmed()  # prompt width 1, response width 1
    assert t.prompt_ids.tolist() == [[7]] and t.response_ids.tolist() == [[14]] and t.rollout_log_probs.tolist() == [[-4]]
    parts = b.split(2)  # 3 rows -> 2 + 1, contiguous
    assert [len(p) for p in parts] == [2, 1] and parts[1].prompt_ids.tolist() == [[8, 9, 10]]
    assert [len(p) for p in b.split(4)] == [1, 1, 1, 0]
    back = RolloutBatch.cat([t, b.select([0])])  # widths padded to the widest (select kept P 3, T 3)
    assert back.prompt_ids.tolist() == [[7, 0, 0], [5, 6, 0]]
    assert back.response_ids.tolist() == [[14, 0, 0], [11, 12, 13]]
    assert back.response_mask.sum(1).tolist() == [1, 3] and back.group_index.tolist() == [0, 0]
    # a field only some parts have is dropped, not invented
    assert RolloutBatch.cat([t.replace(rewards=torch.ones(1)), b.select([0])]).rewards is None


def test_shapes_are_checked():
    b = _batch()
    with pytest.raises(AssertionError, match="advantages"):
        b.replace(advantages=torch.zeros(3, 2))


def test_micro_batches_sort_by_length_and_cover_every_row():
    lengths = torch.tensor([7, 2, 9, 2, 5])
    idx = micro_batch_indices(lengths, 2)
    # stable sort: 1 (2), 3 (2), 4 (5), 0 (7), 2 (9)
    assert [i.tolist() for i in idx] == [[1, 3], [4, 0], [2]]
    b = _batch()
    mbs = b.micro_batches(2)  # sequence lengths 5, 2, 3 -> rows [1, 2], [0]
    assert [i.tolist() for i, _ in mbs] == [[1, 2], [0]]
    assert mbs[0][1].response_ids.shape == (2, 1) and mbs[0][1].prompt_ids.shape == (2, 3)  # trimmed
    with pytest.raises(ValueError):
        micro_batch_indices(lengths, 0)


def test_token_budget_micro_batches():
    from megatron_rpp.data.rollout_batch import padded_tokens

    lengths = torch.tensor([7, 69, 14, 45, 21, 12, 54, 22])
    # sorted: 7 12 14 21 22 45 54 69 (rows 0 5 2 4 7 3 6 1); budget 64 = rows x longest:
    # [7,12,14,21] 4*21=84 > 64 -> [7,12,14] (3*14=42); [21,22] (44; +45 -> 135); [45] (+54 -> 108); [54]; [69] alone
    idx = micro_batch_indices(lengths, micro_batch_size=1, max_tokens=64)
    assert [i.tolist() for i in idx] == [[0, 5, 2], [4, 7], [3], [6], [1]]
    # processed positions: 3*14 + 2*22 + 45 + 54 + 69 = 254 for 256 real... real = 244
    assert padded_tokens(lengths, idx) == 42 + 44 + 45 + 54 + 69 and int(lengths.sum()) == 244
    fixed = micro_batch_indices(lengths, micro_batch_size=4)  # [7,12,14,21] [22,45,54,69]
    assert padded_tokens(lengths, fixed) == 4 * 21 + 4 * 69
    with pytest.raises(ValueError):
        micro_batch_indices(lengths, 1, max_tokens=-1)


def test_balanced_parts_by_tokens():
    from megatron_rpp.data.rollout_batch import balanced_parts

    lengths = torch.tensor([7, 69, 14, 45, 21, 12, 54, 22])
    parts = balanced_parts(lengths, 2)
    # longest first to the lighter part: 69->A, 54->B, 45->B(99), 22->A(91), 21->A(112), 14->B(113), 12->A(124), 7->B(120)
    assert [p.tolist() for p in parts] == [[1, 4, 5, 7], [0, 2, 3, 6]]
    assert [int(lengths[p].sum()) for p in parts] == [124, 120]
    contiguous = [int(lengths[p].sum()) for p in torch.arange(8).tensor_split(2)]
    assert contiguous == [135, 109]  # the split it replaces is far less even
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    assert [len(p) for p in balanced_parts(torch.tensor([5, 5, 5]), 4)] == [1, 1, 1, 0]
