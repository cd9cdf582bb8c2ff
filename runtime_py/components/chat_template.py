"""Gemma 3n's chat template: <bos>, then per turn `<start_of_turn>{role}\n{content}<end_of_turn>\n`, and
`<start_of_turn>model\n` to ask for the answer. Gemma has no system role: a system message is prepended to the first
user turn, as the published template does.

A message's content is a string or, as in the published template, a list of items {"type": "text", "text": ...},
{"type": "image", ...} and {"type": "audio", ...}: each image renders as IMAGE_PLACEHOLDER and each audio clip as
AUDIO_PLACEHOLDER, which runtime_py.components.media then expands into the media spans (as transformers'
Gemma3nProcessor does)."""

from __future__ import annotations

from models.errors import InputError

TEMPLATE = "gemma3n"
IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image_soft_token>", "<audio_soft_token>"


def render(messages: list[dict]) -> str:
    """Messages [{"role": "user"|"model"|"assistant"|"system", "content": str | list of items}] -> the prompt text
    (without BOS)."""
    if not messages:
        raise InputError("empty prompt: give at least one message")
    system = ""
    if messages[0].get("role") == "system":
        content = messages[0].get("content", "")
        if isinstance(content, list):  # the published template takes the first item's text
            content = content[0].get("text", "") if content else ""
        system, messages = str(content) + "\n\n", messages[1:]
    out = []
    for i, m in enumerate(messages):
        role = {"assistant": "model"}.get(m.get("role"), m.get("role"))
        if role not in ("user", "model"):
            raise InputError(f"message {i}: role {m.get('role')!r} is not user, model, assistant or system")
        content = (system if i == 0 else "") + _content_text(m.get("content", ""), i)
        out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def _content_text(content, i: int) -> str:
    if not isinstance(content, list):
        return str(content).strip()
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(str(item.get("text", "")).strip())
        elif kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "audio":
            parts.append(AUDIO_PLACEHOLDER)
        else:
            raise InputError(f"message {i}: content item {item!r} is not of type text, image or audio")
    return "".join(parts)


# The same template in Jinja (Gemma 3n's published template), written into every bundle for apps and HF tooling.
JINJA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""
