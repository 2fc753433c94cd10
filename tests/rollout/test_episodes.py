"""Multi-turn RL episodes: per-turn split for rewritten contexts, one masked episode otherwise; credit."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.episodes import split_episodes, turn_credits


def ids(tok, messages, gen):
    return tok.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"]


def test_rewritten_context_gives_one_episode_per_turn(thinking_tok, three_turns):
    eps = split_episodes(thinking_tok, three_turns, [0.2, 0.0, 1.0], "per_turn", where="rollouts:7")
    assert [e.turn_index for e in eps] == [1, 3, 5]
    assert [e.reward for e in eps] == [0.2, 0.0, 1.0]
    assert [e.where for e in eps] == [
        "rollouts:7 messages[1]",
        "rollouts:7 messages[3]",
        "rollouts:7 messages[5]",
    ]
    for e in eps:  # the prompt is exactly what the model sees at inference time
        assert e.prompt_ids == ids(thinking_tok, three_turns[: e.turn_index], True)
        assert e.loss_mask is None and e.token_rewards() == [e.reward] * len(e.completion_ids)
    assert thinking_tok.decode(eps[0].completion_ids) == "<think>\nLet me add.\n</think>\n\n5<|im_end|>"
    # Turn 1's thought is gone from turn 3's prompt: nothing links the two sequences.
    assert "Let me add." not in thinking_tok.decode(eps[1].prompt_ids)


def test_final_broadcast_discounts_per_turn_back(thinking_tok, three_turns):
    eps = split_episodes(thinking_tok, three_turns, 1.0, "final_broadcast", gamma=0.5)
    assert [e.reward for e in eps] == [0.25, 0.5, 1.0]
    eps = split_episodes(thinking_tok, three_turns, [0.0, 0.0, 2.0], "final_broadcast")
    assert [e.reward for e in eps] == [2.0, 2.0, 2.0]


def test_turn_credits_by_hand():
    assert turn_credits([1.0, -1.0], 2, "per_turn") == [1.0, -1.0]
    assert turn_credits(3.0, 1, "per_turn") == [3.0]
    assert turn_credits(2.0, 4, "final_broadcast", gamma=0.5) == [0.25, 0.5, 1.0, 2.0]
    with pytest.raises(DataError, match="one reward per assistant turn: 3 turn"):
        turn_credits([1.0, 2.0], 3, "per_turn")
    with pytest.raises(DataError):
        turn_credits([1.0, 2.0], 3, "final_broadcast")
    with pytest.raises(ConfigError, match="gamma"):
        turn_credits(1.0, 2, "final_broadcast", gamma=0.0)
    with pytest.raises(ConfigError, match="credit"):
        turn_credits(1.0, 2, "discounted")  # type: ignore[arg-type]


def test_prefix_preserving_is_one_masked_episode(chatml_tok, three_turns):
    (ep,) = split_episodes(chatml_tok, three_turns, [0.2, 0.0, 1.0], "per_turn")
    assert ep.turn_index == 1 and ep.prompt_ids == ids(chatml_tok, three_turns[:1], True)
    full = ids(chatml_tok, three_turns, False)
    assert ep.prompt_ids + ep.completion_ids == full[:-1]  # all but the "\n" after the last <|im_end|>
    assert len(ep.loss_mask) == len(ep.completion_ids)
    spans = [chatml_tok.decode(ep.completion_ids[a:b]) for a, b in ep.turn_spans]
    assert spans == ["5<|im_end|>", "Sure!<|im_end|>", "Bye.<|im_end|>"]
    a, b = ep.turn_spans[0][1], ep.turn_spans[1][0]
    assert (
        chatml_tok.decode(ep.completion_ids[a:b])
        == "\n<|im_start|>user\nOne more?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ep.loss_mask[a:b] == [0] * (b - a)
    assert ep.turn_rewards == [0.2, 0.0, 1.0] and ep.reward == pytest.approx(1.2)
    rewards = ep.token_rewards()
    assert rewards[a:b] == [0.0] * (b - a) and rewards[: ep.turn_spans[0][1]] == [0.2] * ep.turn_spans[0][1]


def test_merged_episode_matches_the_per_turn_split(chatml_tok, three_turns):
    """Each turn's tokens, context and credit are the same whether merged or split."""
    (merged,) = split_episodes(chatml_tok, three_turns, 1.0, "final_broadcast", gamma=0.9)
    split = split_episodes(chatml_tok, three_turns, 1.0, "final_broadcast", gamma=0.9, merge=False)
    assert merged.reward == 1.0 and merged.turn_rewards == pytest.approx([0.81, 0.9, 1.0])
    seq = merged.prompt_ids + merged.completion_ids
    n = len(merged.prompt_ids)
    for ep, (a, b), r in zip(split, merged.turn_spans, merged.turn_rewards, strict=True):
        assert seq[: n + a] == ep.prompt_ids and seq[n + a : n + b] == ep.completion_ids
        assert ep.reward == pytest.approx(r)


def test_unclosed_think_is_data_error(thinking_tok):
    conv = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nLet me"},
    ]
    with pytest.raises(DataError, match="never closed"):
        split_episodes(thinking_tok, conv, 0.0, "final_broadcast")
