"""Chat templates: the Jinja template a GGUF carries (``tokenizer.chat_template``), rendered the way
transformers' ``apply_chat_template`` renders it, so a prompt built here matches the one the model
was tuned on.

The environment mirrors transformers': a sandbox (templates come from model files, i.e. untrusted),
``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` that does not escape HTML, and the
globals ``raise_exception`` and ``strftime_now``.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# llama.cpp's fallback for a file without a template: ChatML, which most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark the assistant's
    tokens for training masks; rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text; raises jinja2.TemplateSyntaxError on a bad one."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **special_tokens: str,
) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with ``template`` (ChatML when None).

    ``special_tokens`` (bos_token, eos_token, ...) are visible to the template, as in transformers.
    """
    compiled = compile_chat_template(template if template is not None else CHATML_TEMPLATE)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
