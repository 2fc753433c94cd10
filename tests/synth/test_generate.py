"""`posttrain generate`: record fields, log-probs against a teacher-forced forward, seeds, resume."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import load_recipe
from posttrain.errors import BackendUnavailable, DataError
from posttrain.synth.generate import (
    GenerateRecipe,
    PromptsConfig,
    load_prompts,
    read_generations,
    run_generate,
)


def _recipe(model_dir, out, *extra):
    return load_recipe(
        GenerateRecipe,
        None,
        [
            f"model.path={model_dir}", f"output_dir={out}", "data.tasks=[arith]", "data.levels=[1]",
            "data.n_per_level=3", "sampling.n=3", "sampling.max_new_tokens=10", "chunk_prompts=2",
            "precision=fp32", *extra,  # fp32: the log-probs are checked against an fp32 forward
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def generated(tiny_model_dir, tmp_path_factory):
    return run_generate(_recipe(tiny_model_dir, tmp_path_factory.mktemp("gen") / "run"))


def test_records_carry_prompt_metadata_completions_and_sampling(generated):
    rows = read_generations(generated)
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) == 3
    for row in rows:
        assert row["prompt"][0]["role"] == "user"
        assert row["metadata"]["scorer"] == "arith" and row["metadata"]["level"] == 1
        assert {"ground_truth", "task"} <= set(row["metadata"])
        s = row["sampling"]
        assert (s["n"], s["temperature"], s["top_p"], s["max_new_tokens"], s["seed"]) == (3, 1.0, 1.0, 10, 0)
        assert len(row["completions"]) == 3
        for c in row["completions"]:
            assert len(c["token_ids"]) == len(c["logprobs"]) == c["num_tokens"] >= 1
            assert c["finish_reason"] in ("stop", "length")
            if c["finish_reason"] == "length":
                assert c["num_tokens"] == 10
            assert all(lp <= 0 for lp in c["logprobs"])


def test_logprobs_sum_to_the_teacher_forced_completion_logprob(generated, tiny_model_dir):
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.rollout.engine import encode_prompt

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    model.eval()
    for row in read_generations(generated):
        assert row["prompt_ids"] == encode_prompt(tok, row["prompt"])
        for c in row["completions"]:
            ids = torch.tensor([row["prompt_ids"] + c["token_ids"]])
            p, n = len(row["prompt_ids"]), len(c["token_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            forced = logp[p - 1 : p + n - 1].gather(1, torch.tensor(c["token_ids"])[:, None]).sum()
            assert abs(float(forced) - sum(c["logprobs"])) < 1e-4


def test_same_seed_same_file_other_seed_other_samples(generated, tiny_model_dir, tmp_path):
    again = run_generate(_recipe(tiny_model_dir, tmp_path / "a"))
    assert again.read_bytes() == generated.read_bytes()
    other = read_generations(run_generate(_recipe(tiny_model_dir, tmp_path / "b", "sampling.seed=1")))
    texts = lambda rows: [c["text"] for r in rows for c in r["completions"]]  # noqa: E731
    assert texts(other) != texts(read_generations(generated))


def test_rerun_after_an_interruption_continues_after_the_last_whole_chunk(
    generated, tiny_model_dir, tmp_path
):
    out = tmp_path / "r"
    run_generate(_recipe(tiny_model_dir, out))
    final, partial, meta_file = (
        out / "generations.jsonl",
        out / "generations.jsonl.partial",
        out / "generate_meta.json",
    )
    lines = final.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["completions"][0]["text"] = "WRITTEN BEFORE THE CRASH"
    # chunk 0 (2 prompts) complete, chunk 1 half-written: as if killed mid-write
    partial.write_text(json.dumps(first) + "\n" + lines[1] + lines[2][:40])
    final.unlink()
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "complete": False}))
    run_generate(_recipe(tiny_model_dir, out))
    rows = read_generations(final)
    assert rows[0]["completions"][0]["text"] == "WRITTEN BEFORE THE CRASH"  # chunk 0 was not redone
    assert final.read_text().splitlines()[1:] == generated.read_text().splitlines()[1:]
    assert not partial.exists()
    mtime = final.stat().st_mtime_ns
    run_generate(_recipe(tiny_model_dir, out))  # complete: skipped
    assert final.stat().st_mtime_ns == mtime


def test_prompt_files_of_every_kind_give_prompts_and_metadata(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": 7},
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (got,) = load_prompts(PromptsConfig(prompts=str(chat)))
    assert got["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert got["metadata"]["reference"] == "4" and got["metadata"]["id"] == 7
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "hi", "metadata": {"scorer": "math", "ground_truth": "1"}}) + "\n"
    )
    (got,) = load_prompts(PromptsConfig(prompts=str(prompts)))
    assert got["prompt"] == [{"role": "user", "content": "hi"}]
    assert got["metadata"]["scorer"] == "math" and got["metadata"]["ground_truth"] == "1"
    tasks = load_prompts(PromptsConfig(tasks=["arith", "sort"], split="test", n_per_level=2, limit=3))
    assert len(tasks) == 3 and all(t["metadata"]["ground_truth"] for t in tasks)


def test_vllm_without_the_extra_fails_naming_it(tiny_model_dir, tmp_path):
    with pytest.raises(BackendUnavailable) as err:
        run_generate(_recipe(tiny_model_dir, tmp_path / "v", "backend=vllm"))
    assert "posttrain[gpu]" in err.value.render()


def test_a_file_that_is_not_generations_is_named(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="x.jsonl:1"):
        read_generations(bad)
    bad.write_text('{"prompt": "a", "completions": []}\n')
    with pytest.raises(DataError, match="non-empty completions"):
        read_generations(bad)


def test_precision_auto_is_resolved_and_recorded(tiny_model_dir, tmp_path):
    from posttrain.models.load import load_model
    from posttrain.rollout.hf_engine import decode_precision

    out = run_generate(_recipe(tiny_model_dir, tmp_path / "auto", "precision=auto", "data.n_per_level=1"))
    meta = json.loads((out.parent / "generate_meta.json").read_text())
    expected, _ = decode_precision("auto", load_model(tiny_model_dir, dtype="float32"), torch.device("cpu"))
    assert meta["precision"] == expected  # fp32 for this small model, whatever the CPU
    fixed = run_generate(_recipe(tiny_model_dir, tmp_path / "fp32", "data.n_per_level=1"))
    assert json.loads((fixed.parent / "generate_meta.json").read_text())["precision"] == "fp32"
