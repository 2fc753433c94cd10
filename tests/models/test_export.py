"""`posttrain export`: GGUF files read back by transformers, LoRA merged by hf export, bad input,
crash safety (a SIGKILL mid-export leaves no half-written OUT), and the rerun skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from posttrain.errors import ConfigError, ModelError
from posttrain.models.export import CHECK_MESSAGES, ExportRecipe, cli_arguments, run_export
from posttrain.models.gguf import import_gguf
from posttrain.models.gguf_export import llama_permute, pre_tokenizer_name, write_gguf
from posttrain.models.heads import ScalarHead, save_value_head
from posttrain.models.load import save_hf_folder
from posttrain.models.peft import PeftConfig, apply_peft, save_adapter_folder
from posttrain.train.pretrain import TinyModelConfig, build_model

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TEXT = "Compute 11 + 16 + 0 + 14. <think>11 + 16 = 27</think> Answer: 41"


def tiny(arch: str, tokenizer):
    """A random tiny model of `arch` (qwen2 / llama via build_model; mistral by hand)."""
    torch.manual_seed(0)
    if arch != "mistral":
        return build_model(TinyModelConfig(arch=arch, **TINY), tokenizer).eval()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export-src")
    return {
        arch: save_hf_folder(tiny(arch, tokenizer), tokenizer, root / arch)
        for arch in ("qwen2", "llama", "mistral")
    }


def logits(model, text: str, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)])).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_gguf_read_back_by_transformers(arch, model_dirs, tokenizer, tmp_path):
    out = run_export(
        ExportRecipe(model_dir=str(model_dirs[arch]), format="gguf", output_dir=str(tmp_path / "out"))
    )
    manifest = json.loads((out / "export.json").read_text())
    source = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    want = logits(source, TEXT, tokenizer)
    rel = {}
    for gguf_type, tolerance in (("f16", 2e-3), ("q8_0", 3e-2)):
        name = f"model-{gguf_type}.gguf"
        reread = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
        rel[gguf_type] = ((logits(reread, TEXT, tokenizer) - want).abs().max() / want.abs().max()).item()
        assert rel[gguf_type] < tolerance
        reread_tok = AutoTokenizer.from_pretrained(out, gguf_file=name)
        assert reread_tok.apply_chat_template(CHECK_MESSAGES) == tokenizer.apply_chat_template(CHECK_MESSAGES)
        assert reread_tok.encode(TEXT) == tokenizer.encode(TEXT)
        assert reread_tok.chat_template == tokenizer.chat_template
        assert manifest["files"][gguf_type]["tokens_equal"] is True
        assert manifest["files"][gguf_type]["relative_diff"] < tolerance
    # Quantisation really happened: q8_0 is smaller and less exact than f16, both not exact.
    assert 0 < rel["f16"] < rel["q8_0"]
    assert (out / "model-q8_0.gguf").stat().st_size < 0.7 * (out / "model-f16.gguf").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-f16.gguf", "model-q8_0.gguf"]


def test_q8_0_file_types(model_dirs, tokenizer, tmp_path):
    """Norms stay F32; 2-D weights are Q8_0; the tied head writes no output.weight."""
    path = write_gguf(tiny("qwen2", tokenizer), tokenizer, tmp_path / "m.gguf", "q8_0", "t")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert "output.weight" not in types
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["general.architecture"].contents() == "qwen2"


def test_f32_round_trip_through_our_importer(model_dirs, tokenizer, tmp_path):
    out = run_export(
        ExportRecipe(model_dir=str(model_dirs["llama"]), gguf_types=["f32"], output_dir=str(tmp_path / "g"))
    )
    assert json.loads((out / "export.json").read_text())["files"]["f32"]["max_abs_logit_diff"] == 0.0
    back = AutoModelForCausalLM.from_pretrained(import_gguf(out / "model-f32.gguf", tmp_path / "hf")).eval()
    source = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    torch.testing.assert_close(
        logits(back, TEXT, tokenizer), logits(source, TEXT, tokenizer), atol=1e-6, rtol=0
    )


def test_llama_permute_by_hand():
    """One head of dim 4: rows [r0, r1 | r2, r3] (rotate-half pairs r0/r2, r1/r3) interleave to
    [r0, r2, r1, r3]; two heads permute independently."""
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(llama_permute(w, 1), w[[0, 2, 1, 3]])
    w2 = np.arange(16, dtype=np.float32).reshape(8, 2)
    np.testing.assert_array_equal(llama_permute(w2, 2), w2[[0, 2, 1, 3, 4, 6, 5, 7]])


def test_hf_export_merges_lora_and_drops_heads(model_dirs, tokenizer, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"]).eval()
    peft_model = apply_peft(base, PeftConfig(method="lora", r=4, alpha=8))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)  # peft starts B at 0, which would make the merge trivial
    peft_model.eval()
    adapter = save_adapter_folder(peft_model, tokenizer, tmp_path / "run" / "final")
    save_value_head(ScalarHead(64), adapter)
    want = logits(peft_model, TEXT, tokenizer)
    out = run_export(
        ExportRecipe(model_dir=str(tmp_path / "run"), format="hf", output_dir=str(tmp_path / "hf"))
    )
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "export.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = logits(merged, TEXT, tokenizer)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (
        got - logits(AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"]), TEXT, tokenizer)
    ).abs().max() > 1e-2
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_prompt_tuning_adapter_cannot_merge(model_dirs, tokenizer, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    adapter = save_adapter_folder(
        apply_peft(base, PeftConfig(method="prompt", num_virtual_tokens=4)), tokenizer, tmp_path / "a"
    )
    with pytest.raises(ModelError, match="cannot be merged"):
        run_export(ExportRecipe(model_dir=str(adapter), format="hf", output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_errors_and_writes_nothing(tokenizer, tmp_path):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    src = save_hf_folder(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2")
    with pytest.raises(ModelError, match="(?s)'gpt2'.*llama, mistral, qwen2"):
        run_export(ExportRecipe(model_dir=str(src), output_dir=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_rope_scaling_and_sentencepiece_are_refused(tokenizer, tmp_path):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )  # fmt: skip
    with pytest.raises(ModelError, match="RoPE scaling 'linear'"):
        write_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "x.gguf", "f16", "x")
    spm = Tokenizer(models.BPE(vocab={"a": 0, "\u2581": 1}, merges=[]))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    with pytest.raises(ModelError, match="byte-level BPE"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=spm))


def test_killed_export_leaves_previous_out_intact(model_dirs, tmp_path):
    src, out = str(model_dirs["qwen2"]), tmp_path / "out"
    run_export(ExportRecipe(model_dir=src, gguf_types=["f16"], check=False, output_dir=str(out)))
    before = (out / "export.json").read_text()
    code = (
        "from posttrain.models.export import ExportRecipe, run_export\n"
        f"run_export(ExportRecipe(model_dir={src!r}, gguf_types=['f16', 'q8_0'], check=False, output_dir={str(out)!r}))"
    )
    env = {**os.environ, "POSTTRAIN_FAULT": "mid-export:1"}  # SIGKILL after the first file
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "export.json").read_text() == before  # the old export, whole
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-f16.gguf"]
    assert [p.name for p in tmp_path.glob("out.tmp-*")]  # the killed run's staging folder
    run_export(ExportRecipe(model_dir=src, gguf_types=["f16", "q8_0"], check=False, output_dir=str(out)))
    assert json.loads((out / "export.json").read_text())["gguf_types"] == ["f16", "q8_0"]
    assert not list(tmp_path.glob("out.tmp-*"))  # stale staging removed


def test_rerun_skips_until_source_changes(model_dirs, tokenizer, tmp_path):
    src = tmp_path / "src"
    save_hf_folder(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), tokenizer, src)
    recipe = ExportRecipe(model_dir=str(src), gguf_types=["f16"], check=False, output_dir=str(tmp_path / "o"))
    stamp = (run_export(recipe) / "model-f16.gguf").stat().st_mtime_ns
    assert (run_export(recipe) / "model-f16.gguf").stat().st_mtime_ns == stamp
    os.utime(src / "model.safetensors", ns=(stamp + 10**9, stamp + 10**9))
    assert (run_export(recipe) / "model-f16.gguf").stat().st_mtime_ns != stamp


def test_cli_arguments():
    assert cli_arguments(["m", "o"], "hf", None) == (None, ['model_dir="m"', 'output_dir="o"', "format=hf"])
    assert cli_arguments(["r.yaml", "check=false"], None, "f16,q8_0") == (
        "r.yaml",
        ["check=false", "gguf_types=[f16,q8_0]"],
    )
    with pytest.raises(ConfigError, match="MODEL_DIR and OUT"):
        cli_arguments(["m"], "gguf", None)
    with pytest.raises(ConfigError, match="gguf_types"):
        ExportRecipe(gguf_types=["q4_k"])


def test_cli_short_form_and_recipe(model_dirs, tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import RECIPE_TYPES, app

    assert RECIPE_TYPES["export"] == "posttrain.models.export:ExportRecipe"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(model_dirs["llama"]), str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    recipe = tmp_path / "export.yaml"
    recipe.write_text(f"model_dir: {tmp_path / 'hf'}\nformat: gguf\noutput_dir: {tmp_path / 'g'}\n")
    result = runner.invoke(app, ["export", str(recipe), "check=false", "--gguf-types", "q8_0"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["export.json", "model-q8_0.gguf"]
