"""``lm_eval --model posttrain``: the start-up hook (posttrain/_lm_eval_hook.py), the .pth that the
package build installs (posttrain/_build.py), and lm-eval's own console command on a local task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

from posttrain._lm_eval_hook import PLACEHOLDER  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
MC = [
    {"question": "2 + 3 =", "choices": ["5", "7", "9"], "answer": 0},
    {"question": "sort 3 1 2:", "choices": ["3 2 1", "1 2 3"], "answer": 1},
    {"question": "7 - 4 =", "choices": ["1", "3"], "answer": 1},
    {"question": "1 + 1 =", "choices": ["2", "11"], "answer": 0},
]


def python(code: str) -> list:
    """Run ``code`` in a fresh interpreter of this venv; its last stdout line, parsed as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hook_registers_a_lazy_placeholder_when_lm_eval_loads_its_models():
    """Without the hook lm-eval knows no ``posttrain``; with it, importing lm_eval.models adds the
    placeholder (nothing of posttrain.eval imported yet), the finder leaves sys.meta_path, and
    lm-eval's get_model resolves it to the adapter class."""
    without = python(
        "import json, posttrain._lm_eval_hook as h; h.uninstall()\n"
        "import lm_eval.models\nfrom lm_eval.api.registry import model_registry as r\n"
        "print(json.dumps(['posttrain' in r, 'hf' in r]))"
    )
    assert without == [False, True]
    got = python(
        "import json, sys, posttrain._lm_eval_hook as h; h.uninstall(); h.install(); h.install()\n"
        "n_finders = sum(isinstance(f, h.LmEvalFinder) for f in sys.meta_path)\n"
        "import lm_eval.models\nfrom lm_eval.api.registry import model_registry as r, get_model\n"
        "raw = dict(r.items())['posttrain']; lazy = 'posttrain.eval.harness' not in sys.modules\n"
        "left = any(isinstance(f, h.LmEvalFinder) for f in sys.meta_path)\n"
        "cls = get_model('posttrain'); from posttrain.eval.harness import lm_class\n"
        "print(json.dumps([n_finders, raw, lazy, left, cls is lm_class(), 'hf' in r]))"
    )
    assert got == [1, PLACEHOLDER, True, False, True, True]


def test_build_puts_the_pth_at_the_root_of_the_wheel_and_the_editable_wheel(tmp_path):
    """The sdist carries the build step (it is in the package), a wheel built from the sdist and
    an editable wheel both hold the .pth at their root and in their RECORD."""
    import tarfile

    from posttrain._build import PTH_LINE, PTH_NAME

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "posttrain", src / "posttrain", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    code = (  # build_meta rewrites sys.argv: read it first
        "import sys, tarfile; from setuptools import build_meta as b\n"
        "out = sys.argv[1]; sdist = b.build_sdist(out); b.build_editable(out)\n"
        "tarfile.open(f'{out}/{sdist}').extractall(f'{out}/unpacked', filter='data')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (unpacked,) = (dist / "unpacked").iterdir()
    code = "import sys; from setuptools import build_meta as b; out = sys.argv[1]; b.build_wheel(out)"
    out = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=unpacked, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with tarfile.open(next(dist.glob("*.tar.gz"))) as tf:
        assert any(n.endswith("posttrain/_build.py") for n in tf.getnames())
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 2  # posttrain-0.1.0-py3-none-any.whl and its 0.editable twin
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(PTH_NAME).decode() == PTH_LINE, wheel.name
            record = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))).decode()
            assert PTH_NAME in record  # pip uninstall removes it


def test_model_args_accept_pretrained_for_path():
    from posttrain.errors import ConfigError
    from posttrain.eval.harness import lm_kwargs

    assert lm_kwargs({"pretrained": "m", "batch_size": 2}, {"batch_size": 8}) == {
        "batch_size": 2,
        "path": "m",
    }
    with pytest.raises(ConfigError, match="both pretrained and path"):
        lm_kwargs({"pretrained": "m", "path": "n"}, None)


def hand_acc(model_path: Path) -> float:
    """Accuracy of picking each question's most likely choice, one forward pass per choice."""
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_model(model_path, tokenizer=tok).eval()
    right = 0
    for row in MC:
        scores = []
        for choice in row["choices"]:
            whole = tok(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(row["question"], add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return right / len(MC)


def pth_installed() -> bool:
    return (Path(sysconfig.get_paths()["purelib"]) / "posttrain-lm-eval.pth").is_file()


@pytest.mark.skipif(
    not pth_installed(), reason="posttrain-lm-eval.pth is not in site-packages: pip install -e ."
)
def test_lm_eval_console_command_runs_the_posttrain_model_offline(tiny_model_dir, tmp_path):
    """``lm_eval --model posttrain --model_args pretrained=DIR --tasks T --include_path DIR``:
    lm-eval's own console script, a local JSONL task, no hub; its acc is the hand-computed one."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "pt_cli_mc.yaml").write_text(
        f"task: pt_cli_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
    )
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "posttrain", "--model_args",
           f"pretrained={tiny_model_dir}", "--tasks", "pt_cli_mc", "--include_path", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("|pt_cli_mc"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "acc"
    assert float(cells[6]) == pytest.approx(hand_acc(tiny_model_dir))
