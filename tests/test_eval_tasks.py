"""Benchmark formats, prompts and metrics (no model): lm-eval's own templates and
metric code are the reference, and every bad input gets its one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from infer import eval_tasks
from infer.eval import item_result, stderr_of_mean, summarize, wilson_interval
from infer.eval_tasks import (TASKS, check_shots, fewshot_context, get_task, load_items,
                              pick_shots)
from cli import main as cli
from meditron_jax.errors import UserError
from meditron_jax.tokenizer import Tokenizer
from tests.eval_fixtures import sample, train_tokenizer

SAMPLES = {"medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa", "mmlu": "mmlu_medical"}


def records(task):
    with open(sample(SAMPLES[task]), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_load_with_balanced_answers(task):
    items = load_items(get_task(task), sample(SAMPLES[task]))
    assert len(items) == 12
    assert [it.index for it in items] == list(range(12))
    n = len(items[0].choices)
    assert items[0].choices == (("yes", "no", "maybe") if task == "pubmedqa" else tuple("ABCD"))
    assert all(0 <= it.gold < n for it in items)
    assert len({it.gold for it in items}) == n  # every option is right somewhere
    assert all(it.text.endswith("\nAnswer:") for it in items)


def test_prompts_match_lm_eval_templates():
    """Our renderings equal lm-eval's own doc_to_text for the same benchmarks."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text as medmcqa_text
    from lm_eval.tasks.medqa.preprocess_medqa import doc_to_text as medqa_text
    from lm_eval.tasks.pubmedqa.preprocess_pubmedqa import doc_to_text as pubmedqa_text
    from lm_eval.utils import apply_template

    for rec, item in zip(records("medmcqa"), load_items(TASKS["medmcqa"], sample("medmcqa"))):
        assert item.text == medmcqa_text(rec)
    for rec, item in zip(records("pubmedqa"), load_items(TASKS["pubmedqa"], sample("pubmedqa"))):
        assert item.text == pubmedqa_text(rec)
    for rec, item in zip(records("medqa"), load_items(TASKS["medqa"], sample("medqa"))):
        gbaker = {"sent1": rec["question"], **{f"ending{i}": rec["options"][k]
                                                for i, k in enumerate("ABCD")}}
        assert item.text == medqa_text(gbaker)
    mmlu = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
            "D. {{choices[3]}}\nAnswer:")  # lm-eval tasks/mmlu/default/_default_template_yaml
    cloze = "Question: {{question.strip()}}\nAnswer:"  # .../continuation/_continuation_template_yaml
    mmlu_items = load_items(TASKS["mmlu"], sample("mmlu_medical"))
    cloze_items = load_items(TASKS["mmlu"], sample("mmlu_medical"), fmt="cloze")
    for rec, item, citem in zip(records("mmlu"), mmlu_items, cloze_items):
        assert item.text == apply_template(mmlu, rec)
        assert citem.text == apply_template(cloze, rec)
        assert list(citem.choices) == rec["choices"] and citem.gold == rec["answer"]


def test_fewshot_context_layout_and_self_exclusion(tmp_path):
    task = TASKS["mmlu"]
    items = load_items(task, sample("mmlu_medical"))
    shots = pick_shots(items[1], items, 2, same_file=True)
    assert [s.index for s in shots] == [0, 2]  # never its own example
    header = "The following are multiple choice questions (with answers).\n\n"
    expected = header + "".join(f"{s.text} {'ABCD'[s.gold]}\n\n" for s in shots) + items[1].text
    assert fewshot_context(items[1], shots) == expected
    assert [s.index for s in pick_shots(items[1], items, 2, same_file=False)] == [0, 1]
    path = write_jsonl(tmp_path / "s.jsonl", [{**records("mmlu")[0], "subject": "clinical_knowledge"}])
    subject = load_items(task, path)
    assert subject[0].description.startswith("The following are multiple choice questions "
                                              "(with answers) about clinical knowledge.")


def test_parquet_and_pubmedqa_json_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    recs = records("medmcqa")
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "m.parquet")
    from_parquet = load_items(TASKS["medmcqa"], str(tmp_path / "m.parquet"))
    assert from_parquet == load_items(TASKS["medmcqa"], sample("medmcqa"))
    # PubMedQA's ori_pqal.json: an object of PMID -> record.
    by_id = {str(1000 + i): r for i, r in enumerate(records("pubmedqa"))}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(by_id))
    items = load_items(TASKS["pubmedqa"], str(tmp_path / "ori_pqal.json"), limit=3)
    assert [it.id for it in items] == ["1000", "1001", "1002"]
    bad = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "cop"} for r in recs[:4]])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet row 1: missing field 'cop'"):
        load_items(TASKS["medmcqa"], str(tmp_path / "bad.parquet"))


# ---- bad input ----------------------------------------------------------------------------
def test_unknown_task():
    with pytest.raises(UserError, match=r"unknown task 'usmle'; choose one of medqa, medmcqa, "
                                        r"pubmedqa, mmlu"):
        get_task("usmle")


@pytest.mark.parametrize("task,field", [("medqa", "answer_idx"), ("medmcqa", "opc"),
                                        ("pubmedqa", "CONTEXTS"), ("mmlu", "choices")])
def test_missing_field_names_field_and_line(tmp_path, task, field):
    recs = records(task)[:5]
    del recs[3][field]
    path = write_jsonl(tmp_path / "x.jsonl", recs)
    with pytest.raises(UserError) as err:
        load_items(TASKS[task], path)
    assert str(err.value).startswith(f"{path}:4: missing field {field!r}")


def test_wrong_task_for_file_names_the_field(tmp_path):
    with pytest.raises(UserError, match=r"medqa_sample.jsonl:1: missing field 'choices'.*--task"):
        load_items(TASKS["mmlu"], sample("medqa"))


@pytest.mark.parametrize("task,field,value,options", [
    ("medqa", "answer_idx", "E", "A, B, C, D"),
    ("medmcqa", "cop", 4, "0..3"),
    ("pubmedqa", "final_decision", "perhaps", "yes, no, maybe"),
    ("mmlu", "answer", 7, "0..3 or A..D"),
])
def test_answer_key_outside_options(tmp_path, task, field, value, options):
    recs = records(task)[:3]
    recs[2][field] = value
    path = write_jsonl(tmp_path / "x.jsonl", recs)
    with pytest.raises(UserError) as err:
        load_items(TASKS[task], path)
    assert str(err.value).startswith(f"{path}:3: answer key {field}={value!r} is outside "
                                     f"the options ({options}")


def test_shots_larger_than_pool():
    items = load_items(TASKS["medqa"], sample("medqa"))
    check_shots(11, items, True, "pool.jsonl")
    with pytest.raises(UserError, match=r"--shots 12 is larger than the few-shot pool \(11 "
                                        r"examples in pool.jsonl, not counting the item itself"):
        check_shots(12, items, True, "pool.jsonl")
    with pytest.raises(UserError, match=r"--shots 13 is larger than the few-shot pool \(12 "):
        check_shots(13, items, False, "pool.jsonl")


def test_cli_bad_input_is_one_line_before_any_model_loads(tmp_path, capsys):
    missing_model = str(tmp_path / "no_model")
    cases = [
        (["--task", "usmle", "--data", sample("medqa")], "unknown task 'usmle'"),
        (["--task", "mmlu", "--data", sample("medqa")], "missing field 'choices'"),
        (["--task", "medqa", "--data", sample("medqa"), "--shots", "12"],
         "--shots 12 is larger than the few-shot pool"),
        (["--task", "medqa", "--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--task", "medqa", "--data", sample("medqa"), "--limit", "0"], "--limit must be >= 1"),
        (["--task", "medqa", "--data", sample("medqa")], "no_model: no such directory"),
    ]
    for argv, message in cases:
        assert cli.main(["eval", "--model", missing_model, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("meditron-jax eval: error:") and message in err, err
        assert "\n" not in err
    assert cli.main(["eval", "--model", str(tmp_path / "ck_*"), "--task", "medqa",
                     "--data", sample("medqa")]) == 2
    assert "matches no directory" in capsys.readouterr().err


# ---- metrics and tokenization ----------------------------------------------------------------
def test_acc_and_acc_norm_follow_lm_eval():
    item = eval_tasks.Item(index=0, id="0", text="q", choices=("a", "bbbb", "cc"), gold=1)
    lls = [-2.0, -4.0, -3.0]  # raw: "a" wins; per character: "bbbb" (-1.0) wins
    rec = item_result(item, lls, [1, 2, 1], [False, False, True])
    assert (rec["pred"], rec["pred_norm"], rec["acc"], rec["acc_norm"]) == (0, 1, 0, 1)
    assert rec["pred_norm"] == int(np.argmax(np.array(lls) / np.array([1.0, 4.0, 2.0])))


def test_interval_and_stderr():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    hits = [1] * 8 + [0] * 2
    assert stderr_of_mean(hits) == pytest.approx(lm_metrics.mean_stderr(hits), rel=1e-12)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)  # Wilson (1927), z=1.96
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == 0.0
    s = summarize([{"acc": h, "acc_norm": 1} for h in hits])
    assert s["n"] == 10 and s["acc"] == 0.8 and s["acc_norm"] == 1.0
    assert s["acc_ci95"] == pytest.approx([lo, hi])
    assert stderr_of_mean([1]) is None  # JSON has no NaN


def test_request_split_matches_lm_eval(tmp_path):
    """The adapter splits (context, continuation) text like lm-eval's TemplateLM, and
    ``meditron-jax eval``'s contexts (no trailing space) split the same way."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import TemplateLM
    from infer.lm_eval_adapter import split_request
    from infer.score import encode_pair
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)

    class Reference(TemplateLM):
        eot_token_id = tok.eos_ids[0]
        tok_encode = staticmethod(lambda s, add_special_tokens=None, **kw: tok.encode(s))
        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    for context, continuation in [("Question: ORS?\nAnswer:", " A"),
                                  ("Answer: ", "yes"),      # the trailing space moves over
                                  ("Dose:", " 10 mg/kg")]:
        expected = Reference()._encode_pair(context, continuation)
        assert split_request(tok, context, continuation, prefix=tok.bos_id) == expected
        if not context.endswith(" "):
            assert encode_pair(tok, context, continuation) == expected
    ctx, cont = split_request(tok, "", " maybe", prefix=tok.bos_id)
    assert ctx == [tok.bos_id] and cont == tok.encode(" maybe", add_bos=False)
