"""Chat templates: a checkpoint's jinja template rendered as transformers renders it.

``ChatTemplate.from_dir(model_dir)`` finds the template where transformers 5 looks
(``chat_template.jinja`` and ``chat_templates/*.jinja`` first, else ``chat_template`` in
``tokenizer_config.json``: a string, or a list of ``{"name", "template"}``), and renders
with the same jinja set-up as ``tokenizer.apply_chat_template(messages, tokenize=False)``:
a sandboxed environment with ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols``
extension; ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape
HTML; the tokenizer config's special tokens (``bos_token``, ``eos_token``, ...) as
variables; ``tools`` and ``documents`` set to none.

``encode_chat`` encodes the text without adding a bos (the template writes one where the
model wants it, as transformers' ``apply_chat_template(tokenize=True)`` does).

``assistant_mask`` gives the tokens an SFT loss trains on: those that overlap the
assistant characters (each span's first to last character, mapped to tokens by offsets
as transformers' ``return_assistant_tokens_mask`` does). A template with
``{% generation %}`` blocks marks those characters itself. A template without
(Llama-3.1-Instruct has none) gets the inference rule: for each assistant message, the
text it adds after ``render(messages[:i], add_generation_prompt=True)``, i.e. what the
model writes for that turn: its content and end-of-turn token, cut after the last eos
token (ChatML's newline after ``<|im_end|>`` is not trained on). A template whose
shorter conversations are not prefixes of the longer one is refused, not guessed at.
Masks need token offsets: a tokenizer.json, not a sentencepiece tokenizer.model.
"""
from __future__ import annotations

import contextvars
import json
import os
import re
from datetime import datetime

from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_json_file

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_START, _END = "\ue000", "\ue001"  # private-use markers around {% generation %} output
_marking = contextvars.ContextVar("chat_template_marking", default=False)


class ChatTemplate:
    def __init__(self, template: str, tokens: dict[str, str] | None = None,
                 source: str = "chat template"):
        import jinja2
        self.source = source
        self.text = template
        self.tokens = dict(tokens or {})
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"{source}: chat template does not parse "
                            f"(line {exc.lineno}: {exc.message})") from None
        self.has_generation_blocks = bool(_GENERATION_TAG.search(template))

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ChatTemplate":
        path = os.fspath(path)
        config_file = os.path.join(path, "tokenizer_config.json")
        cfg = read_json_file(config_file, {})
        if not isinstance(cfg, dict):
            raise UserError(f"{config_file}: expected a JSON object")
        # transformers 5: template files win over the config's entry, which is then ignored.
        files = {}
        if os.path.isfile(os.path.join(path, "chat_template.jinja")):
            files["default"] = os.path.join(path, "chat_template.jinja")
        extra_dir = os.path.join(path, "chat_templates")
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    files[name[:-len(".jinja")]] = os.path.join(extra_dir, name)
        if files:
            templates = {}
            for name, file in files.items():
                with open(file, encoding="utf-8") as f:
                    templates[name] = f.read()
            source = files.get("default", extra_dir)
        else:
            templates, source = cfg.get("chat_template"), config_file
            if isinstance(templates, list):
                try:
                    templates = {t["name"]: t["template"] for t in templates}
                except (TypeError, KeyError):
                    raise UserError(f"{config_file}: chat_template list entries need 'name' "
                                    "and 'template'") from None
        if not templates:
            raise UserError(f"{path} has no chat template (a base model); use plain prompts")
        if isinstance(templates, dict):
            if "default" not in templates:
                raise UserError(f"{source}: several chat templates {sorted(templates)} and "
                                "none named 'default'; add a chat_template.jinja")
            templates = templates["default"]
        if not isinstance(templates, str):
            raise UserError(f"{source}: chat_template must be a string")
        tokens = _special_tokens(cfg)
        if "added_tokens_decoder" not in cfg:  # legacy layout, as transformers reads it
            legacy = read_json_file(os.path.join(path, "special_tokens_map.json"), {})
            tokens.update(_special_tokens(legacy if isinstance(legacy, dict) else {}))
        return cls(templates, tokens, source)

    # ---- rendering ---------------------------------------------------------------------
    def render(self, messages, add_generation_prompt: bool = False, where: str | None = None,
               **variables) -> str:
        """The text ``apply_chat_template(messages, tokenize=False, ...)`` gives;
        ``variables`` are extra template variables (``tools``, ``date_string``, ...)."""
        check_messages(messages, where)
        return self._render(messages, add_generation_prompt, where, variables)

    def encode_chat(self, tokenizer, messages, add_generation_prompt: bool = False,
                    where: str | None = None, **variables) -> list[int]:
        return tokenizer.encode(self.render(messages, add_generation_prompt, where, **variables),
                                add_bos=False)

    def assistant_mask(self, tokenizer, messages, where: str | None = None,
                       **variables) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a 0/1 mask of the assistant tokens:
        those overlapping the assistant characters, located as the module doc says."""
        check_messages(messages, where)
        offsets_of = _offsets_fn(tokenizer)
        if offsets_of is None:
            raise UserError(f"{_at(where)}assistant masks need a tokenizer.json (token "
                            "offsets); this tokenizer is a sentencepiece tokenizer.model")
        if self.has_generation_blocks:
            flat = json.dumps(messages, ensure_ascii=False, default=str)
            if _START in flat or _END in flat:
                raise UserError(f"{_at(where)}a message contains U+E000 or U+E001, which "
                                "mark the {% generation %} blocks here; remove them")
            token = _marking.set(True)
            try:
                text, spans = _strip_markers(self._render(messages, False, where, variables))
            finally:
                _marking.reset(token)
        else:
            text, spans = self._turn_spans(messages, where, variables)
        ids, offsets = offsets_of(text)
        mask = [0] * len(ids)
        for start, end in spans:  # as transformers maps its generation spans to tokens
            first, last = _char_to_token(offsets, start), _char_to_token(offsets, end - 1)
            if first is None:
                break
            for k in range(first, len(ids) if last is None else last + 1):
                mask[k] = 1
        return ids, mask

    def _turn_spans(self, messages, where, variables) -> tuple[str, list[tuple[int, int]]]:
        """The full text, and for each assistant message the characters it adds after the
        conversation before it and the generation prompt, cut after its last eos token."""
        text = self._render(messages, False, where, variables)
        eos = self.tokens.get("eos_token")
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, where, variables)
            after = self._render(messages[:i + 1], False, where, variables)
            if not (after.startswith(before) and text.startswith(after)):
                raise UserError(f"{_at(where)}the chat template of {self.source} does not render "
                                f"the conversation up to message {i} as a prefix of it; the "
                                "assistant tokens cannot be told apart (add {% generation %} "
                                "blocks to the template)")
            end = len(after)
            if eos and after.rfind(eos, len(before)) >= 0:
                end = after.rfind(eos, len(before)) + len(eos)
            spans.append((len(before), end))
        return text, spans

    def _render(self, messages, add_generation_prompt, where, variables) -> str:
        import jinja2
        context = {**self.tokens, "tools": None, "documents": None, **variables}
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **context)
        except jinja2.TemplateError as exc:
            raise UserError(f"{_at(where)}the chat template of {self.source} rejected the "
                            f"messages: {_one_line(exc)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise UserError(f"{_at(where)}the chat template of {self.source} failed on the "
                            f"messages ({type(exc).__name__}: {_one_line(exc)})") from None


def check_messages(messages, where: str | None = None) -> None:
    """A list of ``{"role", "content"}`` objects with known roles, as templates expect."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{_at(where)}messages must be a non-empty list of "
                        f'{{"role", "content"}} objects, got {_describe(messages)}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f'{_at(where)}message {i} must be an object with "role" and '
                            f'"content", got {_describe(m)}')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UserError(f"{_at(where)}message {i} has role {role!r}; use one of "
                            f"{', '.join(ROLES)}")
        if role == "tool" and isinstance(content, (dict, list)):
            continue  # tool results may be JSON (Llama-3.1 renders them with tojson)
        if role == "assistant" and content is None and m.get("tool_calls"):
            continue  # an OpenAI tool-call turn
        if not isinstance(content, str):
            raise UserError(f"{_at(where)}message {i} ({role}) content must be a string, "
                            f"got {_describe(content)}")
        if role in ("user", "assistant") and not content.strip() and not m.get("tool_calls"):
            raise UserError(f"{_at(where)}message {i} ({role}) has empty content; a turn "
                            "needs text")


# ---- helpers -----------------------------------------------------------------------------
def _environment():
    global _ENV
    if _ENV is None:
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}``: the body, wrapped in markers
            while an assistant mask is being computed."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                text = caller()
                return _START + text + _END if _marking.get() else text

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


_ENV = None


def _special_tokens(cfg: dict) -> dict[str, str]:
    """Template variables from a tokenizer config: every ``*_token`` string (or
    ``{"content": ...}`` token) and ``extra_special_tokens`` given as a name -> token map,
    the named and model-specific special tokens transformers passes."""
    extra = cfg.get("extra_special_tokens")
    items = list(cfg.items()) + (list(extra.items()) if isinstance(extra, dict) else [])
    out = {}
    for key, value in items:
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and key.endswith("_token"):
            out[key] = value
    return out


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without generation markers, and each block's (start, end) characters in
    the order the blocks closed (transformers' order)."""
    text, spans, opened, n = [], [], [], 0
    for piece in re.split(f"([{_START}{_END}])", marked):
        if piece == _START:
            opened.append(n)
        elif piece == _END:
            spans.append((opened.pop(), n))
        else:
            text.append(piece)
            n += len(piece)
    return "".join(text), spans


def _offsets_fn(tokenizer):
    """(ids, char offsets) of a text without bos, where the tokenizer can tell them."""
    if getattr(tokenizer, "kind", None) == "sentencepiece":
        return None
    return tokenizer.encode_with_offsets


def _char_to_token(offsets, char: int) -> int | None:
    for k, (start, end) in enumerate(offsets):
        if start <= char < end:
            return k
    return None


def _at(where: str | None) -> str:
    return f"{where}: " if where else ""


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _describe(value) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
