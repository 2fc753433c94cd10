"""Shared fixtures: a tiny model folder with the default tokenizer, built in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Qwen2 (hidden 64, 2 layers) + the default tokenizer trained on task text, saved as an HF folder."""
    from posttrain.models.load import save_hf_folder
    from posttrain.models.tokenizer import train_default_tokenizer
    from posttrain.train.pretrain import CorpusConfig, TinyModelConfig, build_corpus, build_model

    docs = build_corpus(CorpusConfig(n_docs=600), seed=0)
    tok = train_default_tokenizer(docs, vocab_size=400)
    torch.manual_seed(0)
    model = build_model(
        TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128), tok
    )
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_folder(model, tok, out)
    return out
