"""Decode attention over a shared prompt plus per-row suffixes (cascade attention, CPU fused path).

Why: n samples of one prompt attend to the same prompt keys and values. Expanded n times (what the
engine's plain cache does after its one prefill), each decode step reads the prompt's keys/values
n times: SmolLM2 at 32 rows (4 prompts x 8) with 300-token prompts reads 440 MB of fp32 prompt
keys/values a step that way, against 270 MB of bf16 weights.
Here every layer keeps

- the distinct prompts' keys (transposed, (U, KV, D, P)) and values (U, KV, P, D) once;
- each row's generated keys and values (R, KV, S, D) in buffers reserved for
  ``max_new_tokens``, written a row per step.

A decode step scores a row's query against its prompt and its own suffix and takes one softmax
over both, so the result is the same attention as over the concatenated cache (to fp32
summation order). The prompt part runs in a *slot* layout: prompt u owns ``width`` slots, each
row sits in one slot of its prompt, and the queries of all a prompt's rows (and all query heads
of a key/value head) form one (width x G, D) matrix against that prompt's keys: one matmul per
(prompt, key/value head) instead of one per (row, key/value head). Slots of rows that finished are
computed on a stand-in row and never read. The prompts' keys are stored transposed, once: the
(G, D) x (D, L) product over a contiguous (D, L) block ran 2.3x faster than over an (L, D) block's
transpose (32 x 3 x 3 queries, L = 130, fp32). The generated keys are not: writing a column of a
transposed buffer each step (18 us for 32 x 3 heads) cost more than the faster product saved at
up to 64 generated tokens.

Rows that finish are dropped like the engine's reserved cache (`compact_order`: d finished rows
move at most d rows of the suffix buffers); their slots stay, pointing nowhere.
"""

from __future__ import annotations

import torch

from posttrain.models.attention import additive

MIN_SAVED_BYTES = 3 << 20
"""Share when the expanded copies would read at least this much more per layer and step. The
extra index and copy ops of a shared step cost about what 2.4 MB of reads do: on SmolLM2 at 32
rows (4 prompts x 8) a step took the same time both ways with 55-token prompts, 17% less shared
with 100-token prompts, 29% less with 300 (Intel Xeon, 2 threads); tiny models with short
prompts were 4-5% slower shared."""


def worth_sharing(rows: int, prompts: int, width: int, kv_heads: int, head_dim: int) -> bool:
    """Whether ``rows`` rows of ``prompts`` distinct prompts (``width`` columns, fp32 keys and
    values) read enough fewer bytes shared to pay for the slot layout's extra ops."""
    return (rows - prompts) * width * 2 * kv_heads * head_dim * 4 >= MIN_SAVED_BYTES


def move_rows(buf: torch.Tensor, indices: torch.Tensor, end: int) -> torch.Tensor:
    """Keep rows ``indices`` (`compact_order`'s order) of ``buf`` (R, H, capacity, D) in place, up
    to column ``end`` (the filled part); returns the first ``len(indices)`` rows."""
    n = indices.numel()
    moved = (indices != torch.arange(n, device=indices.device)).nonzero().squeeze(1)
    if moved.numel():
        buf[moved, :, :end] = buf[indices[moved], :, :end]  # the right side is gathered first
    return buf[:n]


class GroupLayer:
    """One layer's keys/values: the prompts' once, each row's generated ones reserved."""

    __slots__ = ("prompt_kt", "prompt_v", "k", "v", "length")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, capacity: int):
        """``keys``, ``values``: (U, KV, P, D) of the distinct prompts (padded columns included)."""
        self.prompt_kt = keys.transpose(-1, -2).contiguous()
        self.prompt_v = values.contiguous()
        _, heads, _, d = keys.shape
        self.k = keys.new_empty((rows, heads, capacity, d))
        self.v = values.new_empty((rows, heads, capacity, values.shape[-1]))
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one decode step's keys/values (R, KV, 1, D) into the next row."""
        self.k[:, :, self.length] = k[:, :, 0]
        self.v[:, :, self.length] = v[:, :, 0]
        self.length += 1

    def select(self, indices: torch.Tensor) -> None:
        self.k = move_rows(self.k, indices, self.length)
        self.v = move_rows(self.v, indices, self.length)


class GroupCache:
    """The decode cache of rows that share prompts (module docstring): what `FusedLM.forward`
    calls `attend` on in place of a reserved layer's ``update``."""

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        padding: torch.Tensor | None,
        prompt_of: torch.Tensor,
        capacity: int,
        groups: int,
    ):
        """``layers``: each layer's prompt (keys, values), (U, KV, P, D); ``padding``: (U, P)
        boolean, False at pad columns (None when no prompt is padded); ``prompt_of`` (R,): each
        row's prompt; ``capacity``: the most tokens a row generates; ``groups``: query heads per
        key/value head."""
        u, self.kv_heads, self.prompt_len, _ = layers[0][0].shape
        rows = prompt_of.numel()
        self.layers = [GroupLayer(k, v, rows, capacity) for k, v in layers]
        self.prompts, self.groups = u, groups
        counts = torch.bincount(prompt_of, minlength=u)
        self.width = int(counts.max())
        first = torch.cumsum(counts, 0) - counts  # rows of one prompt are numbered 0.. in order
        order = torch.argsort(prompt_of, stable=True)
        rank = torch.empty_like(prompt_of)
        rank[order] = torch.arange(rows, device=prompt_of.device) - first[prompt_of[order]]
        self.slot = prompt_of * self.width + rank
        dtype = layers[0][0].dtype
        self.bias = None if padding is None else additive(padding, dtype)[:, None, None]  # (U, 1, 1, P)
        self._index()

    def _index(self) -> None:
        """Flat row indices between the row layout (R, KV, G) and the slot layout (U, KV, width,
        G), rebuilt when rows are dropped."""
        rows, heads, g, w = self.slot.numel(), self.kv_heads, self.groups, self.width
        dev = self.slot.device
        row_of_slot = torch.zeros(self.prompts * w, dtype=torch.long, device=dev)  # dead: row 0
        row_of_slot[self.slot] = torch.arange(rows, device=dev)
        kv, grp = torch.arange(heads, device=dev), torch.arange(g, device=dev)
        self.to_slots = (
            row_of_slot.view(self.prompts, 1, w, 1) * (heads * g) + kv.view(1, heads, 1, 1) * g + grp
        ).reshape(-1)
        prompt, rank = self.slot // w, self.slot % w
        self.to_rows = (
            ((prompt.view(rows, 1, 1) * heads + kv.view(1, heads, 1)) * w + rank.view(rows, 1, 1)) * g + grp
        ).reshape(-1)

    def pays(self) -> bool:
        """Whether sharing still saves enough reads for the rows left (`worth_sharing`): the
        engine goes back to an expanded cache (`rows_kv`) when too few rows of a prompt remain."""
        prompts = int(torch.unique(self.slot // self.width).numel())
        head_dim = self.layers[0].prompt_v.shape[-1]
        return worth_sharing(self.slot.numel(), prompts, self.prompt_len, self.kv_heads, head_dim)

    def rows_kv(self, layer: GroupLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's keys and values over its prompt and its suffix, (R, KV, P + t, D)."""
        prompt, t = self.slot // self.width, layer.length
        keys = torch.cat((layer.prompt_kt.transpose(-1, -2)[prompt], layer.k[:, :, :t]), dim=2)
        return keys, torch.cat((layer.prompt_v[prompt], layer.v[:, :, :t]), dim=2)

    def get_seq_length(self) -> int:
        return self.prompt_len + self.layers[0].length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (`compact_order`'s order)."""
        for layer in self.layers:
            layer.select(indices)
        self.slot = self.slot[indices]
        self._index()

    def attend(
        self, layer: GroupLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Append this step's k, v (R, KV, 1, D) to ``layer`` and attend with q (R, H, 1, D) over
        the row's prompt and suffix; returns (R, 1, H * D)."""
        layer.append(k, v)
        rows, nq, _, d = q.shape
        heads, g, p, t = self.kv_heads, self.groups, self.prompt_len, layer.length
        flat = (q * scale).reshape(rows * nq, d)  # query head h reads key/value head h // G
        slots = flat.index_select(0, self.to_slots).view(self.prompts, heads, self.width * g, d)
        prompt_scores = torch.matmul(slots, layer.prompt_kt)  # (U, KV, width G, P)
        if self.bias is not None:
            prompt_scores = prompt_scores + self.bias
        prompt_scores = prompt_scores.view(-1, p).index_select(0, self.to_rows).view(rows, heads, g, p)
        own_keys = layer.k[:, :, :t].transpose(-1, -2)
        own_scores = torch.matmul(flat.view(rows, heads, g, d), own_keys)  # (R, KV, G, t)
        probs = torch.softmax(torch.cat((prompt_scores, own_scores), dim=-1), dim=-1)
        by_slot = probs.view(rows * nq, p + t).index_select(0, self.to_slots)
        prompt_out = torch.matmul(
            by_slot.view(self.prompts, heads, self.width * g, p + t)[..., :p], layer.prompt_v
        )
        out = prompt_out.view(-1, d).index_select(0, self.to_rows).view(rows, heads, g, d)
        out = out + torch.matmul(probs[..., p:], layer.v[:, :, :t])
        return out.view(rows, 1, nq * d)
