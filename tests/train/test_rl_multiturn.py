"""Multi-turn online RL: episodes of sampled conversations (per turn under a history-rewriting
template, one masked episode under a prefix-preserving one), credit and advantages by hand, the
built-in environments, captured vs recomputed log-probs, and a tiny multi-turn GRPO run."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import load_recipe
from posttrain.data.tasks.base import Problem
from posttrain.errors import ConfigError
from posttrain.models.load import load_model, load_tokenizer
from posttrain.models.tokenizer import train_default_tokenizer
from posttrain.rollout.engine import Completion, encode_prompt
from posttrain.rollout.episodes import split_episodes
from posttrain.rollout.multiturn import (
    ENVS,
    EnvStep,
    conversation_episodes,
    followup_add,
    get_env,
    register_env,
    rollout_conversations,
)
from posttrain.rollout.sampling import rollout_defaults
from posttrain.train.lm_loss import token_logprobs
from posttrain.train.rl import RLRecipe, collect_episodes, prepare_batch, run_rl, setup
from posttrain.train.rl_data import rollout_tensors
from posttrain.train.rl_update import score_rollout, spread_turns, turn_advantages

LOGP_TOL = 1e-4  # sampler / teacher-forced log-probs vs one full forward: fp32 summation order
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["Compute 1 + 2. <think>1 + 2 = 3</think> Answer: 3. Now add 5 to your answer. Answer: 8"] * 20
PROBLEM = Problem("arith", 1, "Compute 1 + 2", ("1 + 2 = 3",), "3")
A1 = followup_add(PROBLEM.question, 1)  # what turn 1 asks to add


@pytest.fixture(scope="module")
def thinking_tok():
    """The embedded default template: Qwen3-style, drops <think> of turns before the last user message."""
    return train_default_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def chatml_tok():
    """The same vocabulary with a plain ChatML template (prefix-preserving)."""
    tok = train_default_tokenizer(CORPUS, vocab_size=300)
    tok.chat_template = CHATML
    return tok


class ScriptedEngine:
    """Replies ``script(turn, sample)`` (+ <|im_end|>, finish "stop"); log-probs teacher-forced
    through ``model`` when given (the policy's probability of the scripted reply), else -0.5 each."""

    def __init__(self, tok, script, model=None):
        self.tok, self.script, self.model = tok, script, model

    def generate(self, prompts, params):
        out = []
        for p, messages in enumerate(prompts):
            prompt = encode_prompt(self.tok, messages)
            turn = sum(m["role"] == "assistant" for m in messages)
            for s in range(params.n):
                text = self.script(turn, s)
                ids = self.tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
                out.append(Completion(p, s, prompt, ids, text, self.logprobs(prompt, ids), "stop"))
        return out

    def logprobs(self, prompt, ids):
        if self.model is None:
            return [-0.5] * len(ids)
        seq = torch.tensor([prompt + ids])
        labels = torch.full_like(seq, -100)
        labels[0, len(prompt) :] = seq[0, len(prompt) :]
        batch = {"input_ids": seq, "labels": labels, "attention_mask": torch.ones_like(seq)}
        with torch.no_grad():
            logp, _, _ = token_logprobs(self.model, batch, temperature=1.0, with_entropy=False)
        return logp.tolist()

    def update_weights(self, weights):
        pass


def thought_then(answer: int | str) -> str:
    return f"<think>\nlet me think\n</think>\n\nAnswer: {answer}"


def converse(tok, script, env="followup", max_turns=2, n=1, model=None):
    engine = ScriptedEngine(tok, script, model)
    params = rollout_defaults(n=n, max_new_tokens=32)
    return rollout_conversations(engine, [PROBLEM.prompt_record()], get_env(env), params, max_turns)


# ---------------------------------------------------------------- episodes


def test_rewriting_template_gives_per_turn_episodes_with_the_inference_prompt(thinking_tok):
    (conv,) = converse(thinking_tok, lambda turn, s: thought_then(3 + A1 * turn))
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[2]["content"] == f"Now add {A1} to your answer."
    rows = conversation_episodes(thinking_tok, conv, "per_turn")
    assert len(rows) == 2 and all(r.loss_mask is None for r in rows)
    for k, (row, turn) in enumerate(zip(rows, conv.turns, strict=True)):
        t = 2 * k + 1  # message index of assistant turn k
        inference = thinking_tok.apply_chat_template(conv.messages[:t], add_generation_prompt=True)
        assert row.prompt_ids == inference["input_ids"] == turn.prompt_ids
        assert row.token_ids == turn.token_ids and row.logprobs == turn.logprobs
        assert row.spans == [(k, 0, len(row.token_ids))]
    # split_episodes agrees on the prompts; turn 0's <think> is gone from turn 1's prompt.
    eps = split_episodes(thinking_tok, conv.messages, conv.rewards, "per_turn")
    assert [e.prompt_ids for e in eps] == [r.prompt_ids for r in rows]
    prompt1 = thinking_tok.decode(rows[1].prompt_ids)
    assert "let me think" not in prompt1 and "<think>" not in prompt1 and "Answer: 3" in prompt1
    assert thinking_tok.decode(rows[0].token_ids) == thought_then(3) + "<|im_end|>"


def test_prefix_preserving_template_gives_one_episode_with_user_tokens_masked(chatml_tok):
    (conv,) = converse(chatml_tok, lambda turn, s: f"Answer: {3 + A1 * turn}")
    (row,) = conversation_episodes(chatml_tok, conv, "final_broadcast")
    full = chatml_tok.apply_chat_template(conv.messages)["input_ids"]
    assert row.prompt_ids == conv.turns[0].prompt_ids
    assert row.prompt_ids + row.token_ids == full[:-1]  # all but the "\n" after the last <|im_end|>
    (k0, a0, b0), (k1, a1, b1) = row.spans
    assert (k0, a0, k1) == (0, 0, 1) and b1 == len(row.token_ids)
    assert chatml_tok.decode(row.token_ids[a0:b0]) == "Answer: 3<|im_end|>"
    user = f"\n<|im_start|>user\nNow add {A1} to your answer.<|im_end|>\n<|im_start|>assistant\n"
    assert chatml_tok.decode(row.token_ids[b0:a1]) == user
    assert row.loss_mask == [1] * b0 + [0] * (a1 - b0) + [1] * (b1 - a1)
    assert row.prompt_ids + row.token_ids[:a1] == conv.turns[1].prompt_ids  # turn 1's inference prompt
    assert row.logprobs == [-0.5] * b0 + [0.0] * (a1 - b0) + [-0.5] * (b1 - a1)
    data = rollout_tensors([_scored(conv.record, [row])], 0, False)
    assert data["valid"][0].tolist()[:b1] == [bool(m) for m in row.loss_mask]
    labels = data["labels"][0, len(row.prompt_ids) : len(row.prompt_ids) + b1]
    assert (labels[b0:a1] == -100).all() and (labels[:b0] >= 0).all()
    # merge=False, or a reply the template does not reproduce token for token: one row per turn.
    assert len(conversation_episodes(chatml_tok, conv, "final_broadcast", merge=False)) == 2
    conv.turns[1].token_ids = conv.turns[1].token_ids[:-1]  # as if cut before <|im_end|>
    assert [r.spans for r in conversation_episodes(chatml_tok, conv, "per_turn")] == [
        [(0, 0, b0)],
        [(1, 0, b1 - a1 - 1)],
    ]


def _scored(record, rows):
    from posttrain.train.rl_data import Scored

    return Scored(record, rows, [r.reward for r in rows], [[] for _ in rows], [{} for _ in rows])


# ---------------------------------------------------------------- environments, credit, advantages


def test_environments_and_credit_by_hand(thinking_tok):
    # followup: turn 0 wrong (4), turn 1 right for the true answer (3 + a1): rewards [0, 1].
    (conv,) = converse(thinking_tok, lambda turn, s: thought_then([4, 3 + A1][turn]))
    assert conv.rewards == [0.0, 1.0] and not conv.done and len(conv.turns) == 2
    assert [r.reward for r in conversation_episodes(thinking_tok, conv, "per_turn")] == [0.0, 1.0]
    rows = conversation_episodes(thinking_tok, conv, "final_broadcast", gamma=0.5)
    assert [r.reward for r in rows] == [0.5, 1.0]
    # followup chains: turn 2 wants 3 + a1 + a2.
    a2 = followup_add(PROBLEM.question, 2)
    (conv,) = converse(
        thinking_tok, lambda turn, s: thought_then([3, 3 + A1, 3 + A1 + a2][turn]), max_turns=3
    )
    assert conv.rewards == [1.0, 1.0, 1.0] and conv.messages[-2]["content"] == f"Now add {a2} to your answer."
    # retry: wrong, then right -> done after 2 turns; right at once -> done after 1; max_turns caps it.
    (conv,) = converse(thinking_tok, lambda turn, s: thought_then([5, 3][turn]), env="retry", max_turns=3)
    assert conv.rewards == [0.0, 1.0] and conv.done
    assert conv.messages[2]["content"] == "That is wrong, try again."
    (conv,) = converse(thinking_tok, lambda turn, s: thought_then(3), env="retry", max_turns=3)
    assert conv.rewards == [1.0] and conv.done
    (conv,) = converse(thinking_tok, lambda turn, s: thought_then(9), env="retry", max_turns=3)
    assert conv.rewards == [0.0, 0.0, 0.0] and not conv.done


def test_dynamic_sampling_drops_groups_whose_conversations_all_return_the_same(thinking_tok):
    """Sample 0 answers 3 at turn 0, all else 9: the group of "1 + 2" has returns [1, 0, 0], that of "2 + 3"
    only zeros and is dropped; another round refills."""
    from posttrain.train.rl_data import MultiTurnConfig, PromptSampler
    from posttrain.train.rl_rollout import RolloutConfig, generate_conversations

    other = Problem("arith", 1, "Compute 2 + 3", ("2 + 3 = 5",), "5")
    sampler = PromptSampler([PROBLEM.prompt_record(), other.prompt_record()], seed=0)
    engine = ScriptedEngine(thinking_tok, lambda turn, s: thought_then(3 if (turn, s) == (0, 0) else 9))
    ro = RolloutConfig(prompts_per_step=2, n=3, dynamic_sampling=True, max_refill_rounds=2)
    mt = MultiTurnConfig(env="retry", max_turns=2)
    kept, seen, times = generate_conversations(engine, sampler, get_env("retry"), ro, mt, seed=0, step=1)
    assert times["rollout/rounds"] == 2 and len(seen) == 4 and len(kept) == 2
    assert all(g[0].record["metadata"]["ground_truth"] == "3" for g in kept)
    assert [c.rewards for c in kept[0]] == [[1.0], [0.0, 0.0], [0.0, 0.0]]
    assert sum(g[0].record["metadata"]["ground_truth"] == "5" for g in seen) == 2


def test_turn_advantages_by_hand():
    """Three conversations of one prompt with rewards [0, 1], [1, 1], [0, 0]; grpo, unbiased std."""
    rewards = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    valid = torch.ones(3, 2, dtype=torch.bool)
    group = torch.zeros(3, dtype=torch.long)
    z = 3**-0.5  # std of {0, 1, 1} (and {0, 1, 0}) with Bessel's correction
    # conversation baseline, final_broadcast: returns [1, 1, 0]; mean 2/3.
    adv, _ = turn_advantages("grpo", rewards, valid, rewards[:, -1], group, baseline="conversation", eps=0.0)
    want = torch.tensor([1 / 3, 1 / 3, -2 / 3])[:, None].expand(3, 2) / z
    assert torch.allclose(adv, want, atol=1e-6)
    # turn baseline, per_turn credit: turn 0 z-scores [0, 1, 0], turn 1 z-scores [1, 1, 0].
    adv, _ = turn_advantages("grpo", rewards, valid, rewards.sum(1), group, baseline="turn", eps=0.0)
    want = torch.tensor([[-1 / 3, 1 / 3], [2 / 3, 1 / 3], [-1 / 3, -2 / 3]]) / z
    assert torch.allclose(adv, want, atol=1e-6)
    # A turn only one conversation reached has no baseline: advantage 0; missing turns stay 0.
    valid[1:, 1] = False
    adv, _ = turn_advantages("rloo", rewards, valid, rewards.sum(1), group, baseline="turn", eps=0.0)
    assert (
        adv[0, 1] == 0
        and (adv[1:, 1] == 0).all()
        and torch.allclose(adv[:, 0], torch.tensor([-0.5, 1, -0.5]))
    )

    class Row:
        def __init__(self, conversation, spans):
            self.conversation, self.spans = conversation, spans

    rows = [Row(0, [(0, 0, 2), (1, 4, 5)]), Row(2, [(1, 0, 3)])]
    keep = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    per_turn = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    assert spread_turns(per_turn, rows, keep).tolist() == [[1, 1, 0, 0, 2], [4, 4, 4, 0, 0]]


# ---------------------------------------------------------------- log-probs


@register_env("mt_test_digits")
class DigitsEnv:
    """Dense: the share of digit characters in the reply; always asks for another turn."""

    def step(self, record, messages):
        text = messages[-1]["content"]
        return EnvStep(
            sum(ch.isdigit() for ch in text) / max(len(text), 1), {"role": "user", "content": "More."}
        )


def recipe(model_dir, out, *extra) -> RLRecipe:
    base = [
        f"model.path={model_dir}", f"output_dir={out}", "data.tasks=[arith]", "data.levels=[1,2]",
        "data.n_per_level=16", "data.multi_turn={env: mt_test_digits, max_turns: 3}", "rollout.prompts_per_step=3",
        "rollout.n=4", "rollout.max_new_tokens=10", 'rollout.stop=[" ", "C"]', "eval.n_per_level=0",
        "optim.lr=1e-2", "train.max_steps=2", "train.tensorboard=false",
    ]  # fmt: skip
    return load_recipe(RLRecipe, None, [*base, *extra])


def test_captured_logprobs_equal_recomputed_per_turn(tmp_path, tiny_model_dir):
    s = setup(
        recipe(
            tiny_model_dir,
            tmp_path / "r",
            "data.multi_turn.credit=per_turn",
            "data.multi_turn.merge=false",
            "train.precision=fp32",  # the sampler's own log-probs are then the old ones (auto: rollout)
        )
    )
    batch, m = collect_episodes(s, 1)
    assert m["multiturn/turns_mean"] > 1.5 and m["multiturn/turn3_frac"] > 0  # later turns are in the batch
    assert m["multiturn/merged_frac"] == 0 and all(r.loss_mask is None for r in batch.rows)
    data, _ = prepare_batch(s, batch.groups, batch)
    recomputed, _ = score_rollout(s.model, None, data, temperature=1.0, rows_per_pass=5)
    valid = data["valid"]
    assert torch.allclose(data["old_logp"][valid], recomputed[valid], atol=LOGP_TOL, rtol=0)
    turn = torch.tensor([r.spans[0][0] for r in batch.rows])
    assert (turn > 0).sum() >= 8  # ... on turn-1 and turn-2 episodes, not only turn 0
    for r in batch.rows:  # per-turn credit: each row's advantage is its own turn's
        assert r.reward == batch.credits[r.conversation, r.spans[0][0]]
    s.run.logger.close()


def test_merged_episode_logprobs_equal_a_full_forward(tmp_path, tiny_model_dir, chatml_tok):
    """A merged row's span log-probs (the sampler's, teacher-forced per turn) = one forward of the row."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    tok.chat_template = CHATML
    (conv,) = converse(tok, lambda turn, s: f"Answer: {3 + A1 * turn}", model=model)
    (row,) = conversation_episodes(tok, conv, "final_broadcast")
    assert len(row.spans) == 2
    data = rollout_tensors([_scored(conv.record, [row])], 0, False)
    recomputed, _ = score_rollout(model, None, data, temperature=1.0, rows_per_pass=1)
    valid = data["valid"]
    assert valid.sum() == sum(row.loss_mask) < len(row.token_ids)
    assert torch.allclose(data["old_logp"][valid], recomputed[valid], atol=LOGP_TOL, rtol=0)


# ---------------------------------------------------------------- a tiny run, bad config


def test_multiturn_grpo_trains(tmp_path, tiny_model_dir):
    out = tmp_path / "mt"
    run_rl(recipe(tiny_model_dir, out, "algorithm.kl.coef=0.05"))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("loss/total", "grad_norm", "advantages/std", "pg/entropy"):
            assert torch.isfinite(torch.tensor(r[key])), key
        assert r["advantages/std"] > 0 and r["multiturn/turns_mean"] > 1
        assert 0 <= r["reward/turn1_mean"] <= 1 and "reward/turn2_mean" in r
    before = load_model(tiny_model_dir).state_dict()
    from safetensors.torch import load_file

    after = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after), "parameters did not change"


def test_bad_multiturn_config_is_a_config_error(tmp_path, tiny_model_dir):
    cases = {
        "data.multi_turn.env=folowup": "data.multi_turn.env",
        "algorithm.advantage=gae": "algorithm.advantage",
        "rewards=[{name: format}]": "rewards",
        "algorithm.kl.placement=reward": "algorithm.kl.placement",
        "data.multi_turn.gamma=0": "data.multi_turn.gamma",
    }
    for override, where in cases.items():
        with pytest.raises(ConfigError) as err:
            recipe(tiny_model_dir, tmp_path / "r", override, "algorithm.kl.coef=0.1")
        assert err.value.where == where and err.value.fix, override
    assert {"followup", "retry"} <= set(ENVS)
