"""lm-evaluation-harness adapter: the ``posttrain`` lm-eval model on local task YAMLs (no hub)."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

from posttrain.eval.harness import cut_at, lm_class, run_harness  # noqa: E402

MC = [
    {"question": "2 + 3 =", "choices": ["5", "7", "9"], "answer": 0},
    {"question": "sort 3 1 2:", "choices": ["3 2 1", "1 2 3"], "answer": 1},
    {"question": "7 - 4 =", "choices": ["1", "3"], "answer": 1},
    {"question": "1 + 1 =", "choices": ["2", "11"], "answer": 0},
]
GEN = [{"question": "Compute 2 + 3.", "answer": "5"}, {"question": "Sort: 3 1 2", "answer": "1 2 3"}]


def task_yaml(tmp_path, name: str, rows: list[dict], body: str) -> None:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f'test_split: test\ndoc_to_text: "{{{{question}}}}"\ndoc_to_target: "{{{{answer}}}}"\n{body}'
    )


def hand_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split (encode the whole, the context's tokens first), one position at a time."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    logits = model(input_ids=torch.tensor([whole])).logits[0]
    total, greedy = 0.0, True
    for t in range(n_ctx, len(whole)):
        logp = torch.log_softmax(logits[t - 1].double(), -1)
        total += float(logp[whole[t]])
        greedy &= int(logits[t - 1].argmax()) == whole[t]
    return total, greedy


def hand_greedy(model, tok, context: str, max_new: int) -> str:
    ids = tok(context, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_adapter_matches_hand_loops_and_runs_local_tasks(tiny_model_dir, tmp_path):
    from lm_eval.api.instance import Instance

    lm = lm_class()(path=str(tiny_model_dir), batch_size=3)
    model, tok = lm.model, lm.tokenizer
    reqs = [
        Instance("loglikelihood", {}, (r["question"], " " + c), i)
        for i, r in enumerate(MC)
        for c in r["choices"]
    ]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    with torch.no_grad():
        want = [hand_logprob(model, tok, *r.args) for r in reqs]
        gen_want = [cut_at(hand_greedy(model, tok, r["question"], 8), ["\n"]) for r in GEN]
    assert [g for _, g in got] == [w for _, w in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    gens = lm.generate_until(
        [Instance("generate_until", {}, (r["question"], kwargs), i) for i, r in enumerate(GEN)]
    )
    assert gens == gen_want


@pytest.mark.slow
def test_local_tasks_through_lm_eval_evaluator(tiny_model_dir, tmp_path):
    """The same adapter through lm-eval's own evaluator (~20 s: lm-eval's imports)."""
    lm = lm_class()(path=str(tiny_model_dir))
    with torch.no_grad():
        want = [
            hand_logprob(lm.model, lm.tokenizer, r["question"], " " + c) for r in MC for c in r["choices"]
        ]
        gen_want = [cut_at(hand_greedy(lm.model, lm.tokenizer, r["question"], 8), ["\n"]) for r in GEN]
    task_yaml(tmp_path, "pt_tiny_mc", MC, 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
              "metric_list:\n  - metric: acc\n")  # fmt: skip
    task_yaml(tmp_path, "pt_tiny_gen", GEN, "output_type: generate_until\ngeneration_kwargs:\n"
              '  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n')  # fmt: skip
    from posttrain.eval.runner import (
        eval_command,
    )  # `posttrain eval MODEL --harness ... --harness-include DIR`

    path = eval_command(str(tiny_model_dir), [], harness="pt_tiny_mc,pt_tiny_gen", harness_include=str(tmp_path),
                        output_dir=str(tmp_path / "out"))  # fmt: skip
    res = json.loads(path.read_text())["results"]
    scores = iter(s for s, _ in want)
    picks = [
        max(range(len(r["choices"])), key=lambda _i, it=[next(scores) for _ in r["choices"]]: it[_i])
        for r in MC
    ]
    assert res["pt_tiny_mc"]["acc,none"] == pytest.approx(
        sum(p == r["answer"] for p, r in zip(picks, MC, strict=True)) / len(MC)
    )
    exact = sum(g.strip() == r["answer"] for g, r in zip(gen_want, GEN, strict=True)) / len(GEN)
    assert res["pt_tiny_gen"]["exact_match,none"] == pytest.approx(exact)


def test_unknown_task_is_a_clear_error(tiny_model_dir, tmp_path):
    from posttrain.errors import ConfigError

    task_yaml(tmp_path, "pt_only", MC, 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n')
    with pytest.raises(ConfigError, match="no task 'pt_nope'"):
        run_harness(str(tiny_model_dir), ["pt_nope"], str(tmp_path / "out"), include_path=str(tmp_path))


def test_lm_eval_cli_arguments(tiny_model_dir):
    """What ``lm_eval --model posttrain --model_args ...`` passes: model_args win; the CLI's default
    cuda:0 is dropped without CUDA; the class is in lm-eval's registry under ``posttrain``."""
    from lm_eval.api.registry import get_model

    cls = lm_class()
    assert get_model("posttrain") is cls
    lm = cls.create_from_arg_string(
        f"path={tiny_model_dir},batch_size=2", {"batch_size": 8, "device": "cuda:0"}
    )
    assert lm.batch_size == 2
    if not torch.cuda.is_available():
        assert next(lm.model.parameters()).device.type == "cpu"


def test_search_strategy_as_the_adapters_decoder(tiny_model_dir):
    """``--model_args strategy=...``: greedy search, and best-of-4 at temperature 0 (four copies of
    the greedy chain), give the hand greedy loop's text; keys reach the strategy's config."""
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    reqs = [Instance("generate_until", {}, (r["question"], kwargs), i) for i, r in enumerate(GEN)]
    greedy = lm_class().create_from_arg_string(f"pretrained={tiny_model_dir},strategy=greedy")
    with torch.no_grad():
        want = [cut_at(hand_greedy(greedy.model, greedy.tokenizer, r["question"], 8), ["\n"]) for r in GEN]
    assert greedy.generate_until(reqs) == want
    args = (
        f"pretrained={tiny_model_dir},strategy=best_of_n,n=4,select=likelihood,temperature=0,step.max_depth=3"
    )
    bon = lm_class().create_from_arg_string(args)
    assert bon.search.config == {
        "seed": 0,
        "n": 4,
        "select": "likelihood",
        "temperature": 0,
        "step": {"max_depth": 3},
    }
    assert bon.generate_until(reqs) == want


def test_bad_search_model_args_are_clear_errors(tiny_model_dir):
    from posttrain.errors import ConfigError

    cls = lm_class()
    with pytest.raises(ConfigError, match=r"unknown model_args \['n'\]"):
        cls.create_from_arg_string(f"pretrained={tiny_model_dir},n=4")
    with pytest.raises(ConfigError, match="best_of_n") as err:
        cls.create_from_arg_string(f"pretrained={tiny_model_dir},strategy=best_of_n,nn=4")
    assert err.value.where.startswith("--model_args")
    with pytest.raises(ConfigError, match="ground truth"):
        cls.create_from_arg_string(
            f"pretrained={tiny_model_dir},strategy=best_of_n,select=verifier,scorer=verifier"
        )
    with pytest.raises(ConfigError, match="unknown search strategy"):
        cls.create_from_arg_string(f"pretrained={tiny_model_dir},strategy=best_of_m")
