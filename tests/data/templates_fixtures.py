"""Four chat templates in the real formats of their model families, and word-level tokenizers for them.

Each tokenizer's special tokens are its template's markers, so every marker is one id and
expected token lists can be written by hand (words, punctuation and each whitespace
character are separate tokens; unknown words become ``<unk>``).

- ``CHATML``: plain ChatML (Qwen2.5 / SmolLM2 style), no thinking; prefix-preserving.
- ``QWEN3``: Qwen3's template (thinking, tools, ``enable_thinking``); strips the
  ``<think>`` blocks of assistant turns before the last user query.
- ``DEEPSEEK_R1``: DeepSeek-R1 style; ``<｜User｜>``/``<｜Assistant｜>`` markers, reasoning
  inline in ``content``, history turns keep only what follows ``</think>``, the
  generation prompt pre-fills ``<think>\\n``.
- ``LLAMA3``: Llama-3 style headers with ``<|eot_id|>``; like Llama-2/Mistral it raises
  when roles do not alternate or a system message is not first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

DEEPSEEK_R1 = (
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be the first message') }}{% endif %}"
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A template and the tokens its tokenizer needs."""

    template: str
    specials: tuple[str, ...]  # special tokens (template markers), first is unk
    added: tuple[str, ...]  # added non-special tokens (think tags, tool tags)
    eos: str
    bos: str | None = None
    pad: str | None = None


FAMILIES = {
    "chatml": Family(CHATML, ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"), (), "<|im_end|>"),
    "qwen3": Family(
        QWEN3,
        ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
        "<|im_end|>",
        pad="<|endoftext|>",
    ),
    "deepseek_r1": Family(
        DEEPSEEK_R1,
        ("<unk>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
        ("<think>", "</think>"),
        "<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
    ),
    "llama3": Family(
        LLAMA3,
        (
            "<unk>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        (),
        "<|eot_id|>",
        bos="<|begin_of_text|>",
    ),
}

_TEXT = (
    "system user assistant tool You are helpful a bot Hi Hello there What is the weather in Paris "
    "It sunny Let me add think check sum answer and ok Thanks Bye Sure yes no One more Two "
    "get_weather city name arguments Tools may call or functions"
)
WORDS = [*_TEXT.split(" "), *"0123456789+=?.,!:{}[]\"'#-_/<>", " ", "\n"]


def build_family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose special tokens are the family's template markers."""
    fam = FAMILIES[name]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*fam.specials, *fam.added, *WORDS]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in fam.specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.added])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=fam.eos,
        bos_token=fam.bos,
        pad_token=fam.pad or fam.eos,
        unk_token="<unk>",
    )
    tok.chat_template = fam.template
    return tok


# A multi-turn conversation with reasoning in each family's own convention.
THOUGHT_1, THOUGHT_2 = "Let me add.", "ok"


def conversation(name: str) -> list[dict]:
    """System + two user/assistant exchanges, each reply with reasoning the family can render."""

    def reply(thought: str, answer: str) -> dict:
        if name == "deepseek_r1":  # R1 keeps reasoning inline in content
            return {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"}
        return {"role": "assistant", "content": answer, "reasoning_content": thought}

    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2 + 3?"},
        reply(THOUGHT_1, "5"),
        {"role": "user", "content": "One more?"},
        reply(THOUGHT_2, "Sure!"),
    ]


TOOL_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Let me check.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "ok"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Bye!", "reasoning_content": "ok"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}]
