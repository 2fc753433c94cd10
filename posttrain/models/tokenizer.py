"""The embedded default tokenizer: byte-level BPE with single-token digits and chat markers.

Trained locally with the `tokenizers` library on whatever text the caller gives, so tiny
models built from a config have a real tokenizer without any download.

Format:
- pre-tokenizer: `Digits(individual_digits=True)` then `ByteLevel` (GPT-2 regex), so every
  digit is its own pre-token and BPE can never merge digits (arithmetic needs this); the
  byte-level alphabet means any text round-trips (`decode(encode(x)) == x`).
- special tokens (single ids, dropped by `skip_special_tokens=True`): `<|endoftext|>` (pad),
  `<|im_start|>`, `<|im_end|>` (eos).
- added NON-special tokens (single ids, kept by `skip_special_tokens=True`, as Qwen3 does with
  its think tags): `<think>`, `</think>`, `<step>` (the process-reward step separator).
- chat template: `DEFAULT_TEMPLATE`, thinking-style ChatML in the style of Qwen3.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
STEP_TOKEN = "<step>"

SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
MARKER_TOKENS = (THINK_OPEN, THINK_CLOSE, STEP_TOKEN)

# Thinking-style ChatML (Qwen3 shape):
# - every message renders as `<|im_start|>{role}\n{content}<|im_end|>\n`;
# - an assistant's reasoning comes from `reasoning_content` or an inline `<think>..</think>`
#   at the start of its content; it is rendered as `<think>\n{r}\n</think>\n\n{content}` only
#   for assistant turns after the last real user query (earlier thoughts are stripped from
#   history) and only when it is non-empty;
# - tool results render as Qwen3 does: consecutive `tool` messages share one user turn of
#   `<tool_response>` blocks, and a user turn made only of a tool response is not a query;
# - `tools` (JSON schemas) are listed in the system turn, `tool_calls` as `<tool_call>` JSON.
DEFAULT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call return <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == 'user' and message.content is string
      and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}
{%- set ns.last_query_index = index %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('Unknown role ' + message.role + ': expected system, user, assistant or tool') }}
{%- elif message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and reasoning.strip('\\n') %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for call in message.tool_calls %}
{%- if call.function %}{%- set call = call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}
{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (`tokenizers.Tokenizer`) with isolated digits on `texts`.

    Special and marker tokens are registered before training so BPE never learns them as
    merges; the 256-symbol byte alphabet is always included, so unseen text still encodes.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # normalized=False: markers are matched on the raw text, before the byte-level mapping.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MARKER_TOKENS])
    return tok


def train_default_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    model_max_length: int = 2048,
    padding_side: Literal["left", "right"] = "right",
) -> PreTrainedTokenizerFast:
    """Train the default tokenizer on `texts` and wrap it as a Hugging Face fast tokenizer.

    The result has eos `<|im_end|>`, pad `<|endoftext|>`, no bos, the `DEFAULT_TEMPLATE` chat
    template, and saves/loads with `save_pretrained` / `AutoTokenizer.from_pretrained`.
    `vocab_size` is an upper bound: a small corpus yields fewer merges.
    """
    backend = build_bpe_tokenizer(texts, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        model_max_length=model_max_length,
        padding_side=padding_side,
        # Byte-level BPE stores spaces inside tokens; the cleanup would break round trips.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return tokenizer
