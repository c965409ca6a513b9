"""Chat templates render as transformers renders them, under bounded memory and time; tokenizers with unvetted regexes
are refused."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import jinja2
import pytest
from tokenizers import Regex, normalizers, pre_tokenizers

from helpers import byte_tokenizer
from spacesim import GEMMA_CHAT_TEMPLATE
from steer_core import template
from steer_core.template import RENDER_MEMORY, RENDER_SECONDS, VETTED_PATTERNS, check_tokenizer, render_chat

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 (the template as Meta ships it)
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the template as Qwen ships it)
# transformers' extras: tojson with options, loop controls, generation tags, namespace, dict, the special tokens
EXTRAS_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
    "{% if m.role == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% generation %}{{ m | tojson(indent=2, sort_keys=True) }}{% endgeneration %}{% endfor %}"
    "{{ dict(a=ns.n) | tojson }}{{ strftime_now is defined }}{{ eos_token }}{{ pad_token }}"
    "{% if add_generation_prompt %}→ é 🙂{% endif %}"
)
TEMPLATES = {
    "tiny": byte_tokenizer().chat_template,
    "smollm2": SMOLLM2_TEMPLATE,
    "gemma3": GEMMA_CHAT_TEMPLATE,
    "gemma2": GEMMA2_TEMPLATE,
    "llama32": LLAMA32_TEMPLATE,
    "qwen25": QWEN25_TEMPLATE,
    "extras": EXTRAS_TEMPLATE,
}
CHATS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi  there "}],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "skip", "content": "x"},
        {"role": "user", "content": "quotes \" ' <tags> {{ not jinja }} \\ ünïcödé 🙂"},
        {"role": "stop", "content": "y"},
    ],
]


def _tokenizer(chat_template: str | dict) -> object:
    tok = byte_tokenizer()
    tok.chat_template = chat_template
    return tok


def _expected(tok, chat, generation: bool) -> str:
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)


@pytest.mark.parametrize("name", TEMPLATES)
def test_real_templates_render_byte_identically(name: str) -> None:
    tok = _tokenizer(TEMPLATES[name])
    for chat in CHATS:
        for generation in (False, True):
            try:
                expected = _expected(tok, chat, generation)
            except jinja2.TemplateError as e:  # Gemma 2 refuses system turns: so must we, with the same error
                with pytest.raises(type(e), match=str(e)[:40]):
                    render_chat(tok, chat, generation=generation)
                continue
            got = render_chat(tok, chat, generation=generation)
            if got != expected:  # Llama 3.2's date comes from the clock: a render that straddled midnight
                expected = _expected(tok, chat, generation)
                got = render_chat(tok, chat, generation=generation)
            assert got == expected


def test_a_repos_named_templates_resolve_as_in_transformers() -> None:
    tok = _tokenizer({"default": SMOLLM2_TEMPLATE, "tool_use": QWEN25_TEMPLATE})
    assert render_chat(tok, CHATS[0], generation=True) == _expected(tok, CHATS[0], True)


def test_template_errors_keep_their_jinja_type() -> None:
    tok = _tokenizer("{{ raise_exception('no system role here') }}")
    with pytest.raises(jinja2.TemplateError, match="no system role here"):
        render_chat(tok, CHATS[0], generation=False)
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(jinja2.TemplateSyntaxError):
        render_chat(tok, CHATS[0], generation=False)
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat(tok, [], generation=False)


MEMORY_BOMBS = {
    "repeat": "{{ 'a' * 20000000000 }}",
    "doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s | length }}",
    "ljust": "{{ 'a'.ljust(10**10) }}",
    "center": "{{ 'x' | center(10**10) }}",
    "format width": "{{ '%*s' | format(10**10, 'a') }}",
    "tojson indent": "{{ messages | tojson(indent=10**10) }}",
    "list repeat": "{{ ([1] * 10**10) | length }}",
}
TIME_BOMBS = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "macro tree": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "power": "{{ 10 ** (10 ** 10) }}",
}


def _worker_peaks() -> list[int]:
    """Peak resident memory (bytes) of the live workers."""
    peaks = []
    for worker in list(template._POOL._idle):
        status = Path(f"/proc/{worker.proc.pid}/status").read_text()
        peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return peaks


@pytest.mark.parametrize("name", MEMORY_BOMBS)
def test_memory_bombs_are_refused_at_the_limit(name: str) -> None:
    tok = _tokenizer(MEMORY_BOMBS[name])
    template.warm_up()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"more than {RENDER_MEMORY // 2**20} MB"):
        render_chat(tok, CHATS[0], generation=True)
    assert time.monotonic() - start < RENDER_SECONDS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 64 * 2**20
    assert max(_worker_peaks()) < RENDER_MEMORY + 256 * 2**20  # the worker's own footprint is ~70 MB


@pytest.mark.parametrize("name", TIME_BOMBS)
def test_time_bombs_end_at_the_limit(name: str) -> None:
    tok = _tokenizer(TIME_BOMBS[name])
    template.warm_up()  # so a worker's startup is not timed
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"more than {RENDER_SECONDS:g} s"):
        render_chat(tok, CHATS[0], generation=True)
    assert time.monotonic() - start < RENDER_SECONDS + 1.5


def test_infinite_recursion_is_refused() -> None:
    tok = _tokenizer("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(ValueError, match="recursed too deep"):
        render_chat(tok, CHATS[0], generation=True)


def test_a_huge_output_or_template_is_refused() -> None:
    tok = _tokenizer("{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' * 3 }}{% endfor %}")
    with pytest.raises(ValueError, match="characters"):
        render_chat(tok, CHATS[0], generation=True)
    tok.chat_template = "{# " + "x" * template.TEMPLATE_CHARS + " #}"
    with pytest.raises(ValueError, match=f"templates of up to {template.TEMPLATE_CHARS:,}"):
        render_chat(tok, CHATS[0], generation=True)


def test_a_bomb_does_not_hold_up_another_visitors_render() -> None:
    good, bomb = _tokenizer(SMOLLM2_TEMPLATE), _tokenizer(TIME_BOMBS["nested ranges"])
    template.warm_up()  # every worker started, so the good render below waits for no startup
    errors: list[Exception] = []
    ended: list[float] = []

    def hostile() -> None:
        try:
            render_chat(bomb, CHATS[0], generation=True)
        except ValueError as e:
            errors.append(e)
        ended.append(time.monotonic())

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(0.2)
    # had it waited for the bomb's worker, this render would end after the bomb's refusal
    assert render_chat(good, CHATS[1], generation=True) == _expected(good, CHATS[1], True)
    done = time.monotonic()
    thread.join()
    assert done < ended[0]
    assert errors and "more than" in str(errors[0])
    # and the pool recovered: the killed worker was replaced
    assert render_chat(good, CHATS[0], generation=True) == _expected(good, CHATS[0], True)


def _with_pre_tokenizer(pre_tokenizer: object, normalizer: object = None) -> object:
    tok = byte_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.backend_tokenizer.normalizer = normalizer
    return tok


@pytest.mark.parametrize("pattern", VETTED_PATTERNS)
def test_vetted_tokenizer_patterns_pass(pattern: str) -> None:
    tok = _with_pre_tokenizer(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel()])
    )
    check_tokenizer(tok)
    tok = _with_pre_tokenizer(pre_tokenizers.Metaspace(), normalizers.Replace(Regex(pattern), " "))
    check_tokenizer(tok)


def test_builtin_tokenizer_steps_pass() -> None:
    check_tokenizer(byte_tokenizer())  # a literal-string Split
    check_tokenizer(
        _with_pre_tokenizer(
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]),
            normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁"), normalizers.NFC()]),
        )
    )


def test_unvetted_tokenizer_regexes_are_refused() -> None:
    tok = _with_pre_tokenizer(pre_tokenizers.Split(Regex("(a+)+b"), "isolated"))
    with pytest.raises(ValueError, match=r"pre-tokenizer runs the regex '\(a\+\)\+b'"):
        check_tokenizer(tok)
    tok = _with_pre_tokenizer(pre_tokenizers.Metaspace(), normalizers.Replace(Regex("(x|x)*y"), ""))
    with pytest.raises(ValueError, match="normalizer runs the regex"):
        check_tokenizer(tok)
    tok = _with_pre_tokenizer(pre_tokenizers.Metaspace(), normalizers.Replace(" ", "▁" * 1000))
    with pytest.raises(ValueError, match="writes 1,000 characters"):
        check_tokenizer(tok)


@pytest.mark.e2e
def test_embedded_models_templates_and_tokenizers(smollm2) -> None:
    tok = smollm2.tokenizer
    assert tok.chat_template.strip() == SMOLLM2_TEMPLATE.strip()
    for chat in CHATS[:2]:
        for generation in (False, True):
            assert render_chat(tok, chat, generation=generation) == _expected(tok, chat, generation)
    check_tokenizer(tok)


def test_the_same_conversation_renders_once_and_a_clock_never_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """An export renders the same shipped conversations thousands of times: the worker sees each once."""
    sent: list[bytes] = []
    real = template._POOL.render
    monkeypatch.setattr(template, "_CACHE", template._Renders(10_000))
    monkeypatch.setattr(template._POOL, "render", lambda payload, limit: sent.append(payload) or real(payload, limit))
    tok = _tokenizer(GEMMA_CHAT_TEMPLATE)
    chat = [{"role": "user", "content": "hi"}]
    assert (
        render_chat(tok, chat, generation=True) == render_chat(tok, chat, generation=True) == _expected(tok, chat, True)
    )
    assert len(sent) == 1
    render_chat(tok, chat, generation=False)  # another request
    render_chat(tok, [{"role": "user", "content": "x" * 20_000}], generation=True)  # too long to keep
    render_chat(tok, [{"role": "user", "content": "x" * 20_000}], generation=True)
    assert len(sent) == 4
    dated = _tokenizer("{{ strftime_now('%d') }}{{ messages[0]['content'] }}")
    render_chat(dated, chat, generation=False)
    render_chat(dated, chat, generation=False)
    assert len(sent) == 6, "a template that reads the clock renders anew each time"
    small = template._Renders(50)
    for i in range(20):
        small.put(("t", (("user", f"{i:02d}"),), False, ()), "0123456789")
    assert small._used <= 50 and small.get(("t", (("user", "19"),), False, ())) == "0123456789"
