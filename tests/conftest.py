"""Shared fixtures: a tiny model folder with the default tokenizer, built in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def model_dir(out, n_docs: int, **sizes):
    """A Qwen2 of `sizes` (TinyModelConfig fields) + the default tokenizer trained on `n_docs` task
    documents, seeded, saved as an HF folder at `out`."""
    from posttrain.models.load import save_hf_folder
    from posttrain.models.tokenizer import train_default_tokenizer
    from posttrain.train.pretrain import CorpusConfig, TinyModelConfig, build_corpus, build_model

    tok = train_default_tokenizer(build_corpus(CorpusConfig(n_docs=n_docs), seed=0), vocab_size=400)
    torch.manual_seed(0)
    save_hf_folder(build_model(TinyModelConfig(**sizes), tok), tok, out)
    return out


@pytest.fixture(scope="session")
def build_model_dir():
    """`model_dir` as a fixture, for modules that build a model of other sizes."""
    return model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Qwen2 (hidden 64, 2 layers) + the default tokenizer trained on task text, saved as an HF folder."""
    sizes = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return model_dir(tmp_path_factory.mktemp("tiny") / "model", 600, **sizes)


@pytest.fixture(scope="session")
def student_dir(tiny_model_dir, tmp_path_factory):
    """A smaller model (hidden 32, 1 layer) sharing `tiny_model_dir`'s tokenizer, freshly initialised:
    a distillation student."""
    from posttrain.models.load import load_tokenizer, save_hf_folder
    from posttrain.train.pretrain import TinyModelConfig, build_model

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(1)
    cfg = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    out = tmp_path_factory.mktemp("student") / "model"
    save_hf_folder(build_model(cfg, tok), tok, out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread: two fight each other on a shared CPU (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
