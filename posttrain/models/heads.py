"""Scalar heads on a causal LM: reward models (outcome and process) and value models (PPO critic).

`ScalarHead` maps the backbone's last hidden states to one number per position,
``v_t = w . h_t + b``, so ``values = head(hidden)`` is (B, T). `RewardModel` is a causal LM
(plain or PEFT-wrapped; its LM head is unused) plus a `ScalarHead`. What a model reads:

- outcome RM: the value at the last non-pad token (`last_token_values`), i.e. the end-of-turn
  token of the rendered ``prompt + response``;
- process RM: the values at the step-end tokens (`step_end_mask`): every step separator
  (default ``<step>``) in the response, and the token that ends the last step (default
  ``</think>``), so the final step is scored too; ``sigmoid(v)`` = P(step correct);
- PPO critic: the values at every position.

Saved layout (`save_reward_model`; load with `load_reward_model(path)`): the backbone as a
plain Hugging Face folder (LoRA merged; or a PEFT adapter folder when not merged) plus
``reward_head.safetensors`` (``weight`` (1, H), ``bias`` (1,)) and ``reward_head.json``
(kind, hidden size, the PRM's separator tokens). The backbone folder still loads as a normal
causal LM with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import ModelError

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
HEAD_FORMAT = "posttrain-scalar-head/1"


class ScalarHead(nn.Module):
    """``values = hidden @ w + b``: (B, T, H) -> (B, T), computed in fp32.

    Initialised as TRL's value head: w ~ N(0, 1 / (H + 1)), b = 0, from `seed` alone, so two
    heads built with the same seed are identical whatever the global RNG state.
    """

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, hidden_size, generator=gen) / (hidden_size + 1) ** 0.5)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


VALUE_HEAD_FILE = "value_head.safetensors"


def save_value_head(head: ScalarHead, folder: str | Path) -> Path:
    """Write a PPO critic head next to its exported policy (``folder/value_head.safetensors``),
    written to a temporary name first so an interrupted save leaves no half file."""
    from safetensors.torch import save_file

    path = Path(folder) / VALUE_HEAD_FILE
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(tmp), metadata={"kind": "value_head", "hidden_size": str(head.linear.in_features)})
    tmp.replace(path)
    return path


def load_value_head(folder: str | Path) -> ScalarHead:
    """The critic head saved by `save_value_head` (values = policy hidden states @ w + b)."""
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise ModelError(
            f"{path}: no value head", where=str(folder), fix="export it from a PPO run (advantage gae)"
        )
    state = load_file(str(path))
    head = ScalarHead(state["linear.weight"].shape[1])
    head.load_state_dict(state)
    return head


def backbone_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under PEFT wrappers (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class RewardModel(nn.Module):
    """A causal-LM backbone and a `ScalarHead`: ``forward(...) -> values (B, T)``.

    Prompt-learning PEFT methods (prefix, prompt) prepend virtual tokens and are not
    supported here; LoRA / IA3 / BitFit / full fine-tuning are.
    """

    def __init__(self, backbone: nn.Module, head: ScalarHead, info: dict[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.info = dict(info or {})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        decoder = backbone_lm(self.backbone).get_decoder()
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.head(out.last_hidden_state)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values -> (B,) the value at each row's last attended token (left or right padding)."""
    pos = torch.arange(values.shape[1], device=values.device)
    last = (attention_mask.bool() * pos).argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1)


def step_end_mask(
    input_ids: torch.Tensor, start: torch.Tensor, sep_id: int, end_id: int | None
) -> torch.Tensor:
    """(B, T) bool: where a process RM reads a step's score.

    In each row, from the response start `start` (B,) on: every `sep_id` token before the
    first `end_id` token, and that first `end_id` token itself (the end of the last step).
    With ``end_id=None`` every separator from `start` on counts (the chain then puts a
    separator after its last step). A chain cut before its end token has its last
    (unfinished) step unscored.
    """
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device)[None, :]
    region = pos >= start[:, None]
    if end_id is None:
        return region & (input_ids == sep_id)
    is_end = (input_ids == end_id) & region
    first_end = torch.where(is_end.any(-1), is_end.int().argmax(-1), t)[:, None]
    return region & (((input_ids == sep_id) & (pos < first_end)) | (pos == first_end))


def single_token_id(tokenizer: Any, text: str, what: str) -> int:
    """The id of `text` if the tokenizer encodes it as exactly one token; else a ModelError."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ModelError(
            f"{what} {text!r} is {len(ids)} tokens in this tokenizer; a process reward model reads its "
            "score at a single step-end token",
            where=what,
            fix=f"add it as one token: posttrain templates add-tokens MODEL OUT --tokens '{text}' "
            "(then train from OUT), or choose a separator that is one token",
        )
    return ids[0]


def prm_response(steps: list[str], step_sep: str, last_step_end: str, final: str = "") -> str:
    """The response text a process RM reads: ``<think>s1<sep>s2...sn</think>`` + `final` line.

    With ``last_step_end=""`` there are no think tags and the separator also follows the
    last step: ``s1<sep>...sn<sep>`` + `final`.
    """
    if not last_step_end:
        return "".join(s + step_sep for s in steps) + (f"\n{final}" if final else "")
    body = "<think>" + step_sep.join(steps) + last_step_end
    return body + (f"\n{final}" if final else "")


def save_reward_model(
    model: RewardModel, tokenizer: Any, out_dir: str | os.PathLike, peft_cfg: Any, info: dict[str, Any]
) -> Path:
    """Export the backbone (`posttrain.models.peft.export_model`) and write the head beside it.

    `info` (kind, step separators, ...) goes to ``reward_head.json``. LoRA is merged into
    the backbone in place. Load the result with `load_reward_model`.
    """
    from safetensors.torch import save_file

    from posttrain.models.peft import export_model

    out = export_model(model.backbone, tokenizer, out_dir, peft_cfg)
    head = model.head.linear
    tensors = {
        "weight": head.weight.detach().float().cpu().contiguous(),
        "bias": head.bias.detach().float().cpu(),
    }
    save_file(tensors, str(out / HEAD_WEIGHTS))
    meta = {"format": HEAD_FORMAT, "hidden_size": head.in_features, **info}
    (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def read_head_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``reward_head.json`` of a saved reward model; a ModelError if the folder has none."""
    cfg = Path(path).expanduser() / HEAD_CONFIG
    if not cfg.is_file():
        raise ModelError(
            f"no {HEAD_CONFIG} here, so this is not a posttrain reward model folder",
            where=str(path),
            fix="point at the final/ folder written by `posttrain rm` or `posttrain prm`",
        )
    return json.loads(cfg.read_text())


def load_reward_model(
    path: str | os.PathLike, dtype: str = "auto", device: str = "auto"
) -> tuple[RewardModel, Any]:
    """Load a folder written by `save_reward_model`: returns (RewardModel in eval mode, tokenizer).

    ``model.info`` holds ``reward_head.json`` (``kind`` = "orm" or "prm", and for a PRM its
    ``step_sep`` / ``last_step_end``).
    """
    from safetensors.torch import load_file

    from posttrain.models.load import load_model, load_tokenizer, resolve_device, resolve_dtype

    info = read_head_config(path)
    folder = Path(path).expanduser()
    tokenizer = load_tokenizer(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        target = resolve_device(device)
        backbone = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=resolve_dtype(dtype, target))
        backbone.to(target)
    else:
        backbone = load_model(folder, dtype=dtype, device=device, tokenizer=tokenizer)
    head = ScalarHead(int(info["hidden_size"]))
    state = load_file(str(folder / HEAD_WEIGHTS))
    head.linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    model = RewardModel(backbone, head.to(next(backbone.parameters()).device), info)
    return model.eval(), tokenizer
