"""Render the model's own chat template, as transformers' ``apply_chat_template`` does (jinja2, sandboxed)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError


def _raise(message):
    raise TemplateError(message)


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def user_turn(num_images: int, prompt: str) -> list[dict]:
    """One user turn: the images first, then the text (the layout SmolVLM's model cards use)."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


@lru_cache(maxsize=8)
def _compiled(template: str):
    """Compiling a template costs milliseconds, more than a tiny model's whole prefill: once per template."""
    return _env().from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, variables: dict | None = None) -> str:
    """``variables``: the tokenizer's special tokens (``bos_token``, ...) that transformers passes to templates."""
    try:
        return _compiled(template).render(**(variables or {}), messages=messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise InputError(f"chat template failed: {exc}") from exc
