"""The bundled preference pairs (meditron_jax/data/clinical_preferences*.jsonl): well-formed,
unique, chosen never equal to rejected, enough of them, train and held-out prompts apart,
and short enough for the demo's seq_len of 128 tokens."""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

DATA = os.path.join(os.path.dirname(__file__), "..", "meditron_jax", "data")
FILES = {"train": "clinical_preferences.jsonl", "heldout": "clinical_preferences_heldout.jsonl"}
TOPICS = {"malaria", "tb", "hiv", "diarrhoea", "malnutrition", "maternal", "neonatal", "sepsis",
          "vaccination", "wounds", "dosing", "triage"}


def _read(name):
    out = []
    with open(os.path.join(DATA, FILES[name]), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            assert line.endswith("\n") and line.strip(), f"{FILES[name]}:{line_no}"
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def pairs():
    return {name: _read(name) for name in FILES}


def _normal(text):
    return re.sub(r"\W+", " ", text.lower()).strip()


def test_records_are_well_formed(pairs):
    for name, records in pairs.items():
        for r in records:
            assert set(r) == {"id", "prompt", "chosen", "rejected"}, r
            assert all(isinstance(v, str) and v.strip() for v in r.values()), r
            assert re.fullmatch(r"Question: [^\n]+\?\nAnswer:", r["prompt"]), r["id"]
            # answers continue the prompt as clinical_qa.jsonl's completions do
            assert r["chosen"].startswith(" ") and r["rejected"].startswith(" "), r["id"]
            assert _normal(r["chosen"]) != _normal(r["rejected"]), r["id"]
            assert len(r["chosen"]) <= 200 and len(r["rejected"]) <= 200, r["id"]
            prefix = "pref" if name == "train" else "heldout"
            assert re.fullmatch(rf"{prefix}-([a-z]+)-\d\d", r["id"]).group(1) in TOPICS, r["id"]


def test_counts_ids_and_topics(pairs):
    train, heldout = pairs["train"], pairs["heldout"]
    assert len(train) >= 110 and len(heldout) >= 24
    ids = [r["id"] for r in train + heldout]
    assert len(set(ids)) == len(ids)
    for records in (train, heldout):
        topics = Counter(r["id"].split("-")[1] for r in records)
        assert set(topics) == TOPICS  # every topic in both files
    with open(os.path.join(DATA, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert f"`{FILES['train']}` ({len(train)} pairs)" in readme
    assert f"`{FILES['heldout']}` ({len(heldout)} pairs" in readme


def test_held_out_prompts_are_new(pairs):
    """No held-out prompt (nor answer) appears in the training pairs, and no prompt twice."""
    seen = Counter(_normal(r["prompt"]) for r in pairs["train"] + pairs["heldout"])
    assert max(seen.values()) == 1
    train_answers = {_normal(r[k]) for r in pairs["train"] for k in ("chosen", "rejected")}
    assert not {_normal(r["chosen"]) for r in pairs["heldout"]} & train_answers


def test_pairs_fit_the_demo_sequence_length(pairs, tmp_path):
    """With the demo's tokenizer (512-token BPE learned from the bundled corpus, as
    configs/tiny_pretrain.yaml trains it), bos + prompt + answer + eos <= 128 tokens."""
    from meditron_jax.tokenizer import Tokenizer
    from train import bpe
    from train.config import DataSection
    from train.data import read_records
    docs = read_records([os.path.join(DATA, "clinical_corpus.txt")], DataSection())
    tok = Tokenizer.from_dir(bpe.train_bpe(docs, 512, os.fspath(tmp_path / "tok")))
    lengths = [len(tok.encode(r["prompt"] + r[k])) + 1
               for records in pairs.values() for r in records for k in ("chosen", "rejected")]
    assert max(lengths) <= 128
