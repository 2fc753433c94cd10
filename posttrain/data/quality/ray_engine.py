"""``engine: ray``: the per-record work of `posttrain data clean` as Ray Data operations.

The input is cut into windows of ``ray_window`` rows; each window is one Ray Data pipeline

    from_items(rows) -> map_batches(RecordWorker)  (an actor pool, ``ray_workers`` actors)

whose workers do everything that looks at one record alone, the same functions as the local
engine: validation (`row_item`), the heuristic filters and answer verification
(`clean.record_steps`), normalisation, the record's near-dedup MinHash values and its
decontamination evidence (each worker builds the eval index once). The results come back in
input order (``preserve_order``) to the driver, which runs what needs every earlier record --
exact dedup (hash set), greedy near dedup (LSH query/insert with the workers' MinHash values,
`near_dedup`), the decontamination verdict -- then the model steps, mixing and the files, as
the local engine does. So both engines keep the same records, with the same evidence.

Reading stays on the driver (it names every row's file:line); rows travel pickled. Memory on
the driver: one window of rows in flight plus the exact-dedup hashes and the LSH index.
``ray_address`` joins a cluster; by default a running local one is joined or one is started.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from posttrain.data.quality.decontam import build_index
from posttrain.data.quality.dedup import NearDedupIndex
from posttrain.data.quality.filters import language_detector, tokenizer_counter
from posttrain.data.quality.items import Item, question_text, row_item, row_tuples
from posttrain.errors import BackendUnavailable, DataError

RAY_FIX = (
    "pip install 'posttrain[ray]' (Ray with Ray Data: pip install 'ray[data]>=2.9'), or set engine: local"
)


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or `BackendUnavailable` naming the ``[ray]`` extra."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data needs pandas and pyarrow besides ray)
    except ImportError as exc:
        raise BackendUnavailable(
            f"engine: ray needs Ray Data, which is not installed ({exc})", where="engine", fix=RAY_FIX
        ) from None
    return ray


class RecordWorker:
    """One Ray Data actor: validates, filters, verifies and signs the records of a batch."""

    def __init__(self, recipe: Any):
        from posttrain.data.quality.clean import record_steps

        self.recipe, self.record_steps = recipe, record_steps
        self.index = build_index(recipe.decontam) if recipe.decontam.evals else None
        self.near = NearDedupIndex(recipe.dedup) if recipe.dedup.near else None
        needs_tokens = recipe.tokenizer and recipe.filters.needs_tokens
        self.count_tokens = tokenizer_counter(recipe.tokenizer) if needs_tokens else None
        self.detect = language_detector() if recipe.filters.languages else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [row_item(*pickle.loads(blob)) for blob in batch["blob"]]
        out = []
        for item in self.record_steps(self.recipe, items, self.count_tokens, self.detect):
            if item.removed is None:
                item.pre = {}
                if self.near is not None:
                    item.pre["minhash"] = self.near.signature(item.norm).hashvalues
                if self.index is not None:
                    question = question_text(item.data, item.kind)
                    item.pre["contaminated"] = self.index.find(
                        item.norm, question, normalized=True, raw=item.text
                    )
            out.append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        return {"blob": np.array(out, dtype=object)}


def _windows(recipe: Any) -> Iterator[list[dict]]:
    window: list[dict] = []
    for i, s in enumerate(recipe.sources()):
        for row, where, error, kind in row_tuples(s.path, s.kind, s.split, s.n_per_level, s.seed):
            blob = pickle.dumps((row, where, error, kind, i), protocol=pickle.HIGHEST_PROTOCOL)
            window.append({"blob": blob})
            if len(window) >= recipe.ray_window:
                yield window
                window = []
    if window:
        yield window


def _stop_on_invalid(item: Item) -> None:
    if item.removed is not None and "error" in item.removed.evidence:
        raise DataError(item.removed.evidence["error"], where=item.where,
                        fix="fix or remove the row, or set on_invalid: drop")  # fmt: skip


def ray_items(recipe: Any) -> Iterator[Item]:
    """The items of every input after the record steps, in input order, computed on Ray Data."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=recipe.ray_address, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    workers = recipe.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    for window in _windows(recipe):
        ds = ray.data.from_items(window).map_batches(
            RecordWorker,
            fn_constructor_args=(recipe,),
            batch_size=recipe.ray_batch_size,
            batch_format="numpy",
            concurrency=workers,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["blob"]:
                item = pickle.loads(blob)
                if recipe.on_invalid == "stop":
                    _stop_on_invalid(item)
                yield item
