"""Training data: packing, SFT masks, determinism, resumable position, host shares, bad input."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from meditron_jax.errors import UserError
from train.config import DataSection
from train.data import Loader, read_records

EOS, BOS = 2, 1


class CharTokenizer:
    """One id per character (ids 3+), bos=1: makes expected ids easy to write down."""
    bos_id, eos_ids = BOS, (EOS,)

    def encode(self, text, add_bos=True):
        return ([BOS] if add_bos else []) + [3 + (ord(c) % 200) for c in text]


def write(path, lines):
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def loader(records, batch=2, **kw):
    dcfg = DataSection(**{"seq_len": 16, "packing_bins": 4, **kw})
    return Loader(records, CharTokenizer(), EOS, dcfg, batch)


def rows(ld, n):
    return [next(ld) for _ in range(n)]


def test_pretrain_rows_are_packed_documents_with_segments_and_positions():
    docs = ["abc", "hello", "xy"]
    b = next(loader(docs, shuffle=False))
    texts = []
    for r in range(b["inputs"].shape[0]):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        for s in sorted(set(seg[seg > 0].tolist())):
            idx = np.flatnonzero(seg == s)
            assert (pos[idx] == np.arange(len(idx))).all()  # each segment restarts at 0
            inputs, targets = b["inputs"][r][idx], b["targets"][r][idx]
            assert (targets[:-1] == inputs[1:]).all()  # next-token targets
            assert (b["weights"][r][idx] == 1).all()
            assert inputs[0] == BOS and targets[-1] == EOS
            texts.append("".join(chr(i - 3) for i in inputs[1:]))
        assert (b["weights"][r][seg == 0] == 0).all()  # padding trains nothing
    assert set(texts) == set(docs)  # whole documents (repeating), none cut across rows


def test_sft_loss_only_on_completion_and_eos():
    recs = [("Q: a?\nA:", " yes")]
    b = next(loader(recs, kind="sft", shuffle=False, seq_len=32))
    seg = b["segment_ids"][0]
    idx = np.flatnonzero(seg == 1)
    targets, weights = b["targets"][0][idx], b["weights"][0][idx]
    prompt_len = 1 + len("Q: a?\nA:")  # with bos
    # target j is token j+1: the first trained target is the first completion token
    assert (weights[: prompt_len - 1] == 0).all() and (weights[prompt_len - 1:] == 1).all()
    assert targets[-1] == EOS and weights.sum() == len(" yes") + 1


def test_deterministic_given_seed_and_reshuffled_each_epoch():
    docs = [f"doc{i:02d}" for i in range(20)]
    a = rows(loader(docs, seed=3), 6)
    b = rows(loader(docs, seed=3), 6)
    c = rows(loader(docs, seed=4), 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))


def test_resume_position_gives_the_same_following_batches():
    docs = [f"document number {i}" * (1 + i % 3) for i in range(30)]
    ld = loader(docs, seed=1)
    rows(ld, 7)
    state = json.loads(json.dumps(ld.get_state()))  # what a checkpoint stores
    expect = rows(ld, 5)
    again = loader(docs, seed=1)
    again.set_state(state)
    for x, y in zip(expect, rows(again, 5)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_each_host_reads_a_disjoint_share(tmp_path):
    f = write(tmp_path / "c.jsonl", [json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)])
    d = DataSection(train_files=(f,))
    shares = [read_records([f], d, pid, 2) for pid in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == {f"t{i}" for i in range(10)}


def test_overlong_split_and_truncate_are_counted(caplog):
    long_doc = "x" * 40  # 42 ids with bos/eos -> 41 inputs > seq_len 16
    with caplog.at_level(logging.WARNING, logger="meditron_jax.train"):
        split = loader([long_doc, "ab"], shuffle=False)
        got = rows(split, 2)
    assert "seq_len=16" in caplog.text and "splitting" in caplog.text
    assert split.counts["overlong"] == 1
    assert sum(int(b["weights"].sum()) for b in got) >= 41  # nothing lost when splitting
    trunc = loader([long_doc], shuffle=False, overlong="truncate")
    b = next(trunc)
    assert trunc.counts == {"records": 1, "overlong": 1, "dropped_tokens": 41 - 16, "unfit": 0}
    assert (b["segment_ids"] <= 1).all()  # one piece per row, never continued


def test_counts_describe_one_pass_not_every_epoch():
    """Six batches of two rows cycle these 3 records many times; the counts (and the
    run summary's line) still describe the data once."""
    ld = loader(["x" * 40, "ab", "cd"], overlong="truncate")
    rows(ld, 6)
    assert ld.counts == {"records": 3, "overlong": 1, "dropped_tokens": 25, "unfit": 0}
    assert ld.report() == ("train data: 1 of the 3 records were longer than seq_len=16 and "
                           "were truncated (25 tokens dropped per pass)")
    state = json.loads(json.dumps(ld.get_state()))
    again = loader(["x" * 40, "ab", "cd"], overlong="truncate")
    again.set_state(state)  # a resumed run keeps counting the same pass
    rows(again, 3)
    assert again.counts == ld.counts


def test_sft_prompt_that_fills_seq_len_is_skipped_and_counted():
    fits, fills = ("Q?", " yes"), ("Q" * 20, " no")  # 21 prompt tokens > seq_len 16
    ld = loader([fills, fits], kind="sft", overlong="truncate", shuffle=False)
    got = rows(ld, 4)
    assert ld.counts == {"records": 2, "overlong": 1, "dropped_tokens": 24 - 16, "unfit": 1}
    assert "1 of them kept nothing to train on (the prompt fills seq_len)" in ld.report()
    trained = {int(t) for b in got for t in b["targets"][b["weights"] > 0]}
    assert trained == {3 + ord(c) for c in " yes"} | {EOS}  # only the record that fits


@pytest.mark.parametrize("batch", [1, 2])
def test_no_record_that_fits_is_an_error_not_an_endless_loop(batch):
    """Every prompt fills the row: the loader would cycle the file forever."""
    recs = [("P" * 20, " a"), ("P" * 30, " b")]  # 21 and 31 prompt tokens with bos
    with pytest.raises(UserError, match=r"^qa\.jsonl: no record has anything to train on within "
                                        r"data\.seq_len=16 with data\.overlong=truncate: every "
                                        r"prompt fills the row \(longest prompt 31 tokens, "
                                        r"shortest 21\)"):
        Loader(recs, CharTokenizer(), EOS, DataSection(kind="sft", seq_len=16, overlong="truncate"),
               batch, source="qa.jsonl")
    # the same records under the default policy train on their completions
    assert next(loader(recs, batch=batch, kind="sft"))["weights"].sum() > 0


def test_text_files_split_on_separator_lines(tmp_path):
    f = write(tmp_path / "c.txt", ["first doc\nline two\n", "---\n", "\n", "---\n", "second\n"])
    assert read_records([f], DataSection()) == ["first doc\nline two", "second"]


@pytest.mark.parametrize("lines,kind,match", [
    (['{"text": "ok"}\n', '{"text": "broken"\n'], "pretrain", r"c.jsonl:2: malformed JSON"),
    (['{"prompt": "p", "completion": "c"}\n', '{"prompt": "p"}\n'], "sft",
     r"c.jsonl:2: SFT record has no 'completion'"),
    (['{"prompt": "p", "completion": "  "}\n'], "sft", r"c.jsonl:1: .*empty 'completion'"),
    (['{"body": "x"}\n'], "pretrain", r"c.jsonl:1: record has no string field 'text'"),
    (['\n', '{"text": "   "}\n'], "pretrain", r"no documents \(the corpus is empty\)"),
])
def test_bad_data_files(tmp_path, lines, kind, match):
    f = write(tmp_path / "c.jsonl", lines)
    with pytest.raises(UserError, match=match):
        read_records([f], DataSection(kind=kind))


def test_missing_and_empty_file_lists(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_records([str(tmp_path / "nope.txt")], DataSection())
    with pytest.raises(UserError, match="train_files is empty"):
        read_records([], DataSection())
    f = write(tmp_path / "e.txt", ["---\n", "\n"])
    with pytest.raises(UserError, match="corpus is empty"):
        read_records([f], DataSection())
