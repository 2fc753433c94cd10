"""Experiment-tracker backends behind `train.loggers`: tensorboard, mlflow, wandb, trackio.

metrics.jsonl is always written (it is what report.html, resume and the pipeline report read);
these backends mirror the same scalars to a tracker. All of them stay on this machine:

- `tensorboard`: event files in RUN_DIR/tb (a core dependency).
- `mlflow`: a local SQLite store, RUN_DIR/mlflow.db, unless MLFLOW_TRACKING_URI names another
  store; experiment "posttrain", run name = the run folder's name; a resumed run continues the
  same MLflow run (its id is kept in RUN_DIR/mlflow_run_id). Extra `posttrain[mlflow]`.
  Read back with `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`.
- `wandb`: offline mode into RUN_DIR/wandb (`wandb sync` uploads it later). Extra `posttrain[wandb]`.
- `trackio`: its local SQLite store under RUN_DIR/trackio unless TRACKIO_DIR is set.
  Extra `posttrain[trackio]`.

Each backend is imported only when named; a missing one is a BackendUnavailable naming the extra.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from posttrain.errors import BackendUnavailable, ConfigError

LOGGERS = ("tensorboard", "mlflow", "wandb", "trackio")
_MODULE = {
    "tensorboard": "torch.utils.tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "trackio": "trackio",
}
PROJECT = "posttrain"


class Backend(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def check_loggers(names: Sequence[str], key: str = "train.loggers") -> list[str]:
    """Validate the names (ConfigError listing the valid ones) and that each backend imports."""
    out = []
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"{key}: unknown logger {name!r}", fix=f"use some of {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_MODULE[name].split(".")[0]) is None:
            raise BackendUnavailable(
                f"{key} names {name} but the {_MODULE[name]} package is not installed",
                fix=f"pip install 'posttrain[{name}]' torch==2.13.0, or remove {name} from {key}",
            )
        if name not in out:
            out.append(name)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a param value's length
    return out


class MLflow:
    def __init__(self, run_dir: Path, config: dict) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(PROJECT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(PROJECT)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id + "\n")
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()]
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_dir.name, dir=str(run_dir), mode="offline",
                              config=config, id=_stable_id(run_dir), resume="allow")  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run_dir: Path, config: dict) -> None:
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read when trackio is imported
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=run_dir.name, config=config, resume="allow")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


BACKENDS: dict[str, Callable[[Path, dict], Any]] = {
    "tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio,
}  # fmt: skip


def open_backends(names: Sequence[str], run_dir: Path, config: dict | None = None) -> list[Backend]:
    """Start each named backend for `run_dir` (names checked with `check_loggers` first)."""
    return [BACKENDS[n](run_dir, config or {}) for n in check_loggers(names)]
