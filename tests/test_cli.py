"""The front door: `meditron-jax` help, unknown commands and bad --model paths give
one-line errors with the fix, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli.main import COMMANDS, main

MODEL_COMMANDS = {
    "convert": ["--out", "{tmp}/out"],
    "export": ["--out", "{tmp}/out"],
    "generate": ["--prompt", "hello"],
    "score": ["--input", "{tmp}/in.jsonl", "--out", "{tmp}/out.jsonl"],
    "eval": ["--task", "medqa", "--data", "{tmp}/in.jsonl"],
}


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_help_shows_options_and_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: meditron-jax {name}")
    assert "--" in out
    options_with_values = [ln for ln in out.splitlines() if ln.strip().startswith("--")]
    if options_with_values:
        assert "default" in out, f"{name} --help shows no defaults"


def test_unknown_and_missing_command(capsys):
    code, _, err = _run(["frobnicate"], capsys)
    assert code == 2 and "unknown command 'frobnicate'" in err and "convert" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run([], capsys)
    assert code == 2 and "give a command" in err


@pytest.mark.parametrize("name", sorted(MODEL_COMMANDS))
def test_bad_model_paths_are_one_line_errors(name, tmp_path, capsys):
    record = {"id": 1, "question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
              "answer_idx": "A", "context": "c", "continuation": " d"}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    extra = [a.format(tmp=tmp_path) for a in MODEL_COMMANDS[name]]
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    no_weights = tmp_path / "hf_no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}))
    cases = {
        str(tmp_path / "missing"): "no such directory",
        str(not_a_dir): "not a directory",
        str(no_weights): "safetensors",
    }
    for path, message in cases.items():
        code, _, err = _run([name, "--model", path] + extra, capsys)
        assert code == 2, (name, path, err)
        assert message in err, (name, path, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_an_os_error_no_command_caught_is_one_line(monkeypatch, capsys):
    import errno
    import infer.score_cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl")
    monkeypatch.setattr(infer.score_cli, "run", full_disk)
    assert main(["score", "--model", "m", "--input", "i", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["meditron-jax score: error: /data/out.jsonl: No space left on device"]
