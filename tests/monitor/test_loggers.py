"""RunLogger: event lines, resume truncation, tracker backends (MLflow round trip through a real run)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.monitor.html_report import anomaly_events, read_rows
from posttrain.monitor.logger import RunLogger
from posttrain.monitor.loggers import check_loggers


def test_event_lines_and_report_on_close(tmp_path):
    log = RunLogger(tmp_path, loggers=[])
    log.log(1, {"loss": 2.0})
    log.event(1, "anomaly", detector="grad_spike", metric="grad_norm", value=9.5, threshold=3.0)
    log.log(2, {"loss": 1.0})
    log.close()
    rows = read_rows(tmp_path)
    assert [r.get("loss") for r in rows] == [2.0, None, 1.0]
    assert anomaly_events(rows) == [rows[1]] and rows[1]["detector"] == "grad_spike"
    assert "grad_spike" in (tmp_path / "report.html").read_text()


def test_resume_drops_later_steps_and_a_torn_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    log = RunLogger(tmp_path, loggers=[], resume_step=2)
    log.log(3, {"loss": 0.25})
    log.close(report=False)
    assert [(r["step"], r["loss"]) for r in read_rows(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_unknown_logger_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        check_loggers(["tensorbord"])
    assert "tensorbord" in str(exc.value) and "mlflow" in str(exc.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_backend_names_the_extra():
    with pytest.raises(BackendUnavailable) as exc:
        check_loggers(["tensorboard", "wandb"])
    assert "posttrain[wandb]" in str(exc.value) and "train.loggers" in str(exc.value)


@pytest.mark.slow  # a real SFT run plus MLflow's database set-up: ~15 s
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mlflow's own use of sqlalchemy
@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow not installed: pip install 'posttrain[mlflow]'"
)
def test_mlflow_round_trip_of_a_real_run(tmp_path, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe, run_sft

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    overrides = [f"model.path={tiny_model_dir}", "data.train=tasks", "data.eval=null", "data.n_per_level=4",
                 "data.tasks=[arith]", "train.max_steps=3", "train.batch_size=4", "train.seq_len=128",
                 "train.loggers=[mlflow]", f"output_dir={out}"]  # fmt: skip
    run_sft(load_recipe(SFTRecipe, None, overrides))
    logged = [r for r in read_rows(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["train.loggers"] == "['mlflow']"
    for key in ("loss", "grad_norm", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [1, 2, 3]
        assert all(math.isclose(v, r[key], rel_tol=1e-12) for (_, v), r in zip(history, logged, strict=True))
    assert not (out / "tb").exists()  # loggers replaces the tensorboard default
    assert 'data-name="loss"' in (out / "report.html").read_text()


def test_the_anomaly_detectors_event_is_marked_in_the_report(tmp_path):
    from posttrain.train.anomaly import Anomaly

    found = Anomaly(kind="kl_limit", metric="kl/token_mean", step=2, recent=[0.1, 0.9], threshold=0.5,
                    message="KL 0.9 > 0.5", settings=["anomaly.kl_max"])  # fmt: skip
    log = RunLogger(tmp_path, loggers=[])
    for step, kl in ((1, 0.1), (2, 0.9)):
        log.log(step, {"kl/token_mean": kl})
    event = found.event()
    log.event(event.pop("step"), event.pop("event"), **event)
    log.close()
    html = (tmp_path / "report.html").read_text()
    assert html.count('class="marker"') == 1 and "step 2: kl_limit, kl/token_mean = 0.9" in html
    assert "<td>kl_limit</td><td>kl/token_mean</td><td>0.1, 0.9</td><td>0.5</td>" in html
