"""The ``generate`` command: streaming, JSONL sweeps to stdout or a file, --help, and
every bad input as a one-line error (exit 2) that loses nothing already written."""
from __future__ import annotations

import io
import json
import sys

import pytest

from infer.engine import Generator
from infer.generate_cli import TextStream
from infer.sweep import SETTINGS_SUFFIX
from cli import main as cli
from meditron_jax.io.loading import load_model
from tests import hf_fixtures


@pytest.fixture(scope="module")
def text_model(tiny_hf_dir, tmp_path_factory):
    return hf_fixtures.add_word_tokenizer(tiny_hf_dir, tmp_path_factory.mktemp("words"),
                                          [f"w{i}" for i in range(4, 256)])


@pytest.fixture(scope="module")
def library_greedy(text_model):
    """What the library generates (greedy, 12 tokens) for the prompts used below."""
    model = load_model(text_model)
    texts = ["w10 w11 w12", "w50", "w7 w7 w7 w7 w7 w7"]
    prompts = [model.tokenizer.encode(t) for t in texts] + [[1, 5, 9]]
    return Generator(model, batch_size=2).generate(prompts, max_new_tokens=12)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


class Recorder(io.StringIO):
    """A stdout that remembers each write (to see text arrive in pieces)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        if s:
            self.writes.append(s)
        return super().write(s)


def test_prompt_streams_the_completion(text_model, library_greedy, monkeypatch, capsys):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["generate", "--model", text_model, "--prompt", "w10 w11 w12",
                     "--max-new-tokens", "12"]) == 0
    assert out.getvalue() == library_greedy[0].text + "\n"
    assert len(out.writes) > 3                      # arrived token by token, not at the end
    err = capsys.readouterr().err
    assert "prompts=1" in err and "tokens=12" in err and "tokens/s=" in err


def test_prompts_file_to_stdout(text_model, library_greedy, tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "w10 w11 w12"},
                                        {"id": 2, "prompt": "w50"},
                                        {"id": "c", "prompt": "w7 w7 w7 w7 w7 w7"},
                                        {"id": "ids", "prompt_ids": [1, 5, 9]}])
    assert cli.main(["generate", "--model", text_model, "--prompts", src,
                     "--max-new-tokens", "12", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    rows = {r["id"]: r for r in map(json.loads, captured.out.splitlines())}
    assert list(rows) and set(rows) == {"a", 2, "c", "ids"}
    for key, want in zip(["a", 2, "c", "ids"], library_greedy):
        assert rows[key] == {"id": key, "completion": want.text, "completion_ids": want.ids,
                             "finish_reason": want.finish_reason}
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith("prompts=4 skipped=0 total=4 tokens=") and "tokens/s=" in summary


def test_stacked_and_per_layer_weights_generate_the_same(text_model, library_greedy, capsys):
    """The CLI's default on one CPU device is per-layer weights (the tests above compare
    it with the library's stacked weights); stacked on request gives the same, and so does
    the XLA attention named explicitly."""
    for flags in (["--layers", "stacked"], ["--layers", "per-layer", "--attention", "xla"]):
        assert cli.main(["generate", "--model", text_model, "--prompt", "w50",
                         "--max-new-tokens", "12"] + flags) == 0
        assert capsys.readouterr().out == library_greedy[1].text + "\n"


def test_truncate_prompt_flag(text_model, tmp_path, capsys):
    long = [1] + [5] * 250
    src = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt_ids": long}])
    assert cli.main(["generate", "--model", text_model, "--prompts", src,
                     "--max-new-tokens", "10"]) == 2
    assert "--truncate-prompt" in capsys.readouterr().err
    assert cli.main(["generate", "--model", text_model, "--prompts", src,
                     "--max-new-tokens", "10", "--truncate-prompt"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["completion_ids"]) <= 10


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ["--prompt TEXT", "--prompts FILE.jsonl", "--max-new-tokens N",
                 "--temperature T", "--top-k K", "--top-p P", "--seed S", "--stop STR",
                 "--mesh SPEC", "--batch-size B", "--out FILE.jsonl", "--overwrite",
                 "--truncate-prompt"]:
        assert flag in text, flag
    assert "(default: 128)" in text and "(default: 8)" in text
    assert "MEDITRON_DISTRIBUTED=0|1" in text  # the environment epilog
    assert "--attention {auto,xla,splash,cudnn}" in text


BAD_LINES = [
    ('{"id": 9, "prompt": "w4"', "p.jsonl:2: malformed JSON"),
    ({"prompt": "w4"}, 'p.jsonl:2: missing "id"'),
    ({"id": "a", "prompt": "w5"}, 'p.jsonl:2: duplicate id "a" (first on line 1)'),
    ({"id": [1], "prompt": "w5"}, '"id" must be a non-empty string or an integer'),
    ({"id": 2, "prompt": "  "}, "p.jsonl:2: empty prompt"),
    ({"id": 2, "prompt_ids": []}, "p.jsonl:2: empty prompt_ids"),
    ({"id": 2, "prompt_ids": [1, 256]}, "token id 256 is outside the vocabulary"),
    ({"id": 2, "prompt_ids": [1, "x"]}, '"prompt_ids" must be a list of integers'),
    ({"id": 2}, 'exactly one of "prompt" (text) or "prompt_ids"'),
    ({"id": 2, "prompt_ids": list(range(1, 250))}, "p.jsonl:2: 249 prompt tokens + 8 new"),
]


@pytest.fixture(scope="module")
def done_before(text_model, tmp_path_factory) -> dict[str, str]:
    """A finished sweep's output and settings files (name suffix -> text)."""
    tmp = tmp_path_factory.mktemp("done")
    src, out = _write(tmp / "p.jsonl", [{"id": "done-before", "prompt": "w4"}]), tmp / "o.jsonl"
    assert cli.main(["generate", "--model", text_model, "--prompts", src, "--out", str(out),
                     "--max-new-tokens", "8"]) == 0
    return {s: (tmp / f"o.jsonl{s}").read_text() for s in ("", SETTINGS_SUFFIX)}


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_prompt_lines(text_model, done_before, tmp_path, capsys, line, message):
    src = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "w4"}, line])
    out = tmp_path / "out.jsonl"
    for suffix, text in done_before.items():
        (tmp_path / f"out.jsonl{suffix}").write_text(text)
    assert cli.main(["generate", "--model", text_model, "--prompts", src, "--out", str(out),
                     "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    for suffix, text in done_before.items():                 # nothing lost, nothing added
        assert (tmp_path / f"out.jsonl{suffix}").read_text() == text


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--mesh", "data=16"], "needs 16 devices but only 8"),
    (["--mesh", "tensor=8"], "4 query heads are not divisible by tensor=8"),
    (["--mesh", "data=4", "--batch-size", "6"], "batch size 6 is not divisible"),
    (["--mesh", "pipeline=2"], "expected comma-separated AXIS=SIZE"),
    (["--out", "x.jsonl"], "--out goes with --prompts"),
    (["--layers", "per-layer", "--mesh", "data=2"], "--layers per-layer runs on one"),
    (["--attention", "splash"], "--attention splash is a TPU kernel and this run is on cpu"),
])
def test_bad_flags(text_model, capsys, extra, message):
    assert cli.main(["generate", "--model", text_model, "--prompt", "w4 w5"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_text_needs_a_tokenizer(tiny_hf_dir, tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt": "hello"}])
    assert cli.main(["generate", "--model", tiny_hf_dir, "--prompts", src]) == 2
    assert "p.jsonl:1: text prompt but" in capsys.readouterr().err
    src = _write(tmp_path / "q.jsonl", [{"id": 1, "prompt_ids": [1, 2]}])
    assert cli.main(["generate", "--model", tiny_hf_dir, "--prompts", src,
                     "--stop", "x"]) == 2
    assert "--stop needs a tokenizer" in capsys.readouterr().err


def test_text_stream_holds_back_what_may_still_change():
    vocab = {1: "the", 2: "pa", 3: "tient", 4: "STOP", 5: "\ufffd"}
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), ["STOP"])
    assert stream.push([1]) == "the"
    assert stream.push([2]) == "pa"
    assert stream.push([5]) == ""            # an unfinished character waits
    stream = TextStream(lambda ids: " ".join(vocab[i] for i in ids), ["the STOP"])
    assert stream.push([2, 1]) == "pa "      # "the" may start the stop string
    assert stream.push([4]) == ""            # ... it did: never printed
    assert stream.finish("pa ") == ""
