"""Gemma 3n's chat template: <bos>, then per turn `<start_of_turn>{role}\n{content}<end_of_turn>\n`, and
`<start_of_turn>model\n` to ask for the answer. Gemma has no system role: a system message is prepended to the first
user turn, as the published template does."""

from __future__ import annotations

from models.errors import InputError

TEMPLATE = "gemma3n"


def render(messages: list[dict]) -> str:
    """Messages [{"role": "user"|"model"|"assistant"|"system", "content": str}] -> the prompt text (without BOS)."""
    if not messages:
        raise InputError("empty prompt: give at least one message")
    system = ""
    if messages[0].get("role") == "system":
        system, messages = str(messages[0].get("content", "")) + "\n\n", messages[1:]
    out = []
    for i, m in enumerate(messages):
        role = {"assistant": "model"}.get(m.get("role"), m.get("role"))
        if role not in ("user", "model"):
            raise InputError(f"message {i}: role {m.get('role')!r} is not user, model, assistant or system")
        content = (system if i == 0 else "") + str(m.get("content", "")).strip()
        out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)



# The same template in Jinja (Gemma's published template), written into every bundle for apps and HF tooling.
JINJA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""
