"""``meditron-jax serve``: the OpenAI-compatible server, driven by the official ``openai``
client (and raw HTTP for malformed input) against a tiny random model on the real
continuous-batching engine, started once for the module on a free loopback port.

What is compared: each answer with offline greedy generation (infer.engine.Generator);
streamed chunks with the non-streamed text; the chat prompt with transformers'
``apply_chat_template`` ids; prompt log-probs with an independent transformers pass.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from infer.engine import Generator  # noqa: E402
from infer.sampling import Sampling  # noqa: E402
from serve import cli as serve_cli  # noqa: E402
from tests.eval_fixtures import make_eval_snapshot  # noqa: E402

TEMPLATE = open(os.path.join(os.path.dirname(__file__), "data", "chat_templates",
                             "SmolLM2-135M-Instruct.jinja"), encoding="utf-8").read()
MAX_LEN = 512
WAIT = 120  # seconds: the bound on every wait in this module
SEEDS = ["The first-line treatment for uncomplicated falciparum malaria is",
         "A child with diarrhoea and some dehydration should receive oral rehydration salts",
         "Severe acute malnutrition in a child aged 6 to 59 months",
         "Question: How is neonatal sepsis treated?\nAnswer:"]
# Every prompt here (completion, chat, echo, the lm-eval items) is 65 to 128 tokens long:
# one prompt bucket, so the engine, the scorer and the offline Generator compile once each
PROMPTS = [f"Case {i}: " + ". ".join(SEEDS[(i + k) % 4] for k in range(4)) for i in range(32)]
MAX_TOKENS = [8 if i % 3 else 16 for i in range(32)]  # one offline cache shape (192 slots)
CHAT = [{"role": "system", "content": "You are a careful paediatric assistant."},
        {"role": "user", "content": "A 2-year-old (12 kg) has a fever of 39.5°C. Dose?"}]


def chat_snapshot(path) -> str:
    """The evaluation tests' tiny model and byte-level BPE, with SmolLM2's chat template
    in tokenizer_config.json (as an instruct checkpoint ships it)."""
    snap = make_eval_snapshot(path)
    with open(os.path.join(snap, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                   "pad_token": "<|pad|>", "chat_template": TEMPLATE}, f)
    return snap


def serve_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


class Running:
    """A uvicorn server in a thread on a loopback port (bounded start and stop)."""

    def __init__(self, app):
        self.sock = serve_cli.bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = serve_cli.uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(WAIT)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return chat_snapshot(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache for the module: the SIGTERM test's child process
    serves the same model with the same settings and loads these executables instead of
    compiling them again."""
    from tests.train_support import compilation_cache
    with compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
        yield path


SERVE_FLAGS = ["--slots", "4", "--queue-size", "64", "--max-len", str(MAX_LEN),
               "--no-warmup", "--batch-size", "4",
               "--no-prefix-cache"]  # prefix reuse: tests/test_prefix_reuse.py


@pytest.fixture(scope="module")
def served(snap, jax_cache):
    args = serve_args("--model", snap, *SERVE_FLAGS)
    app, service, engine, _ = serve_cli.build(args)
    running = Running(app)
    yield running, service, engine
    running.close()
    assert not engine.running  # the server's shutdown drained and stopped the engine


@pytest.fixture(scope="module")
def client(served):
    running, *_ = served
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", timeout=WAIT,
                         max_retries=0)


@pytest.fixture(scope="module")
def generator(served):
    _, service, _ = served
    return Generator(service.model, batch_size=8)


def offline(generator, prompts_ids, max_new) -> list:
    return generator.generate(prompts_ids, max_new_tokens=max_new, sampling=Sampling())


# ---- answers -----------------------------------------------------------------------------------
def test_32_concurrent_requests_equal_offline_greedy(served, client, generator):
    _, service, _ = served
    tok = service.tokenizer

    def ask(i):
        return client.completions.create(model="tiny-chat", prompt=PROMPTS[i],
                                         max_tokens=MAX_TOKENS[i], temperature=0)

    assert all(65 <= len(tok.encode(p)) <= 128 for p in PROMPTS)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32), timeout=WAIT))
    for n in sorted(set(MAX_TOKENS)):
        rows = [i for i in range(32) if MAX_TOKENS[i] == n]
        want = offline(generator, [tok.encode(PROMPTS[i]) for i in rows], n)
        for i, w in zip(rows, want):
            got = answers[i]
            assert got.choices[0].text == w.text, i
            assert got.choices[0].finish_reason == w.finish_reason
            assert got.usage.completion_tokens == len(w.ids)
            assert got.usage.prompt_tokens == len(tok.encode(PROMPTS[i]))
    assert len({a.choices[0].text for a in answers}) > 8   # not one answer for all
    assert {a.choices[0].finish_reason for a in answers} >= {"length"}


def test_streaming_chunks_concatenate_to_the_answer(client):
    kwargs = dict(model="tiny-chat", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    plain = client.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "length" and len(plain.text) > 16
    stop = plain.text[10:13]
    for extra in ({}, {"stop": [stop, "never seen"]}):
        whole = client.completions.create(**kwargs, **extra).choices[0]
        chunks = list(client.completions.create(stream=True, **kwargs, **extra))
        assert len(chunks) >= 2
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
        if extra:  # cut before the stop string's first occurrence
            assert whole.finish_reason == "stop"
            assert whole.text == plain.text[:plain.text.index(stop)]
    whole = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=16,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=CHAT,
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_prompt_is_transformers_apply_chat_template(served, snap, client, generator):
    from transformers import AutoTokenizer
    ref_ids = AutoTokenizer.from_pretrained(snap).apply_chat_template(
        CHAT, add_generation_prompt=True, return_dict=False)
    assert isinstance(ref_ids[0], int) and 65 <= len(ref_ids) <= 128
    got = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=12,
                                         temperature=0)
    want = offline(generator, [ref_ids], 12)[0]
    assert got.usage.prompt_tokens == len(ref_ids)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"


def test_echo_logprobs_equal_transformers(snap, client):
    """Prompt log-probs (echo) against a transformers forward pass, float64 log-softmax."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(snap, "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(snap, dtype=torch.float32).eval()
    prompts = [PROMPTS[0], PROMPTS[3]]
    out = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=0,
                                    echo=True, logprobs=2, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == prompts
    for c in out.choices:
        ids = tok(prompts[c.index]).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        lp = c.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-4)
        best = [float(logp[i - 1].max()) for i in range(1, len(ids))]
        np.testing.assert_allclose([max(t.values()) for t in lp.top_logprobs[1:]], best,
                                   atol=2e-4)
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
        assert "".join(lp.tokens) == "<|begin_of_text|>" + prompts[c.index]


# ---- bad input ---------------------------------------------------------------------------------
def _post(url, path, body, raw=False):
    data = body if raw else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"},
                      timeout=WAIT)


BAD = [
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "x"', 400, None, "invalid_json"),
    ("/v1/completions", b'[1, 2]', 400, None, "invalid_json"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_token": 3}, 400,
     "max_token", "unknown_field"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": CHAT, "temprature": 0}, 400,
     "temprature", "unknown_field"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": -1}, 400,
     "temperature", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "top_k": 1.5}, 400, "top_k",
     None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, 400,
     "max_tokens", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "n": 2}, 400, "n", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "stop": ""}, 400, "stop", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "logprobs": 9}, 400,
     "logprobs", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": [[1, 99999]]}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": [1] * 500, "max_tokens": 20}, 400,
     "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "doctor",
                                                                  "content": "hi"}]},
     400, "messages", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/nothing", {}, 404, None, "404"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD,
                         ids=[f"{i}-{b[4] or b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(served, path, body, status, param, code):
    running, service, _ = served
    active = len(service.active)
    r = _post(running.url, path, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["message"]
    assert len(service.active) == active  # nothing was queued


def test_openai_client_raises_on_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-chat", prompt="x", temperature=3)
    assert info.value.body["param"] == "temperature"
    assert "between 0 and 2" in info.value.body["message"]


def test_base_model_has_no_chat(served, client):
    _, service, _ = served
    saved = service.template, service.template_error
    service.template, service.template_error = None, "x has no chat template (a base model)"
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=4)
    finally:
        service.template, service.template_error = saved
    assert info.value.body["code"] == "no_chat_template"
    assert "/v1/completions" in info.value.body["message"]


def test_models_and_health(served, client):
    running, *_ = served
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    r = httpx.get(running.url + "/health", timeout=WAIT)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    engine = r.json()["engine"]   # the engine's counters (no prefix pool on this server)
    assert engine["compilations"] == served[2].compilations
    assert engine["prefix_hits"] == engine["prefix_tokens_reused"] == 0
    assert engine["seconds"] == dict(served[2].seconds)   # prefill / decode wall seconds
    assert set(engine["seconds"]) == {"prefill", "decode"}


def test_disconnect_mid_stream_frees_the_slot(served, client):
    """The client reads one event of a 380-token stream and goes away: the server cancels
    the engine request (counted in service.cancelled only when it was still running)."""
    running, service, engine = served
    before = service.cancelled
    body = {"model": "tiny-chat", "prompt": PROMPTS[5], "max_tokens": 380, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", running.url + "/v1/completions", json=body,
                      timeout=WAIT) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + WAIT
    while service.cancelled == before or service.active:
        assert time.monotonic() < deadline, "the stream's request was not cancelled"
        time.sleep(0.05)
    assert service.cancelled == before + 1
    # the freed slot serves the next request
    again = client.completions.create(model="tiny-chat", prompt=PROMPTS[5], max_tokens=4,
                                      temperature=0)
    assert again.choices[0].finish_reason == "length"


# ---- lm-eval against the server ----------------------------------------------------------------
def test_lm_eval_local_completions_matches_meditron_eval(served, snap, tmp_path):
    """lm-eval's own ``local-completions`` model (echo + logprobs requests, its own
    tokenization with the checkpoint's tokenizer) against the server: per option
    log-likelihoods and accuracies equal ``meditron-jax eval``'s on the bundled MedMCQA
    sample (0-shot: every prompt in the module's one prompt bucket)."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    # registers local-completions whatever an earlier test did to lm-eval's lazy registry
    import lm_eval.models.openai_completions  # noqa: F401
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text

    from cli import main as cli
    from tests.eval_fixtures import sample
    running, *_ = served
    assert cli.main(["eval", "--model", snap, "--task", "medmcqa", "--data", sample("medmcqa"),
                     "--shots", "0", "--out", str(tmp_path / "ours")]) == 0
    base = tmp_path / "ours" / "tiny-chat" / "medmcqa"
    ours = [json.loads(x) for x in open(base / "items.jsonl")]
    summary = json.loads((base / "summary.json").read_text())
    task = {"task": "medmcqa_served", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": sample("medmcqa")},
                               "cache_dir": str(tmp_path / "hf_datasets")},
            "test_split": "test", "num_fewshot": 0, "output_type": "multiple_choice",
            "doc_to_text": doc_to_text, "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "cop",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}]}
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": running.url + "/v1/completions", "model": "tiny-chat",
                    "tokenizer_backend": "huggingface", "tokenizer": snap,
                    "add_bos_token": True, "batch_size": 8, "max_retries": 1,
                    "timeout": WAIT},
        tasks=[task], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_defaults=False))
    samples = sorted(out["samples"]["medmcqa_served"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours) == 12
    for s, rec in zip(samples, ours):
        served_ll = [resp[0][0] for resp in s["resps"]]
        np.testing.assert_allclose(served_ll, rec["loglikelihoods"], atol=1e-4, rtol=0)
    metrics = out["results"]["medmcqa_served"]
    assert metrics["acc,none"] == pytest.approx(summary["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(summary["acc_norm"])


# ---- generate --chat ---------------------------------------------------------------------------
CHATS = [CHAT, [CHAT[0], {"role": "user", "content": "How is severe dehydration treated "
                                                     "in a child of 12 kg?"}]]


def test_generate_chat_renders_as_transformers(snap, generator, tmp_path, capsys):
    from transformers import AutoTokenizer

    from cli import main as cli
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n"
                           for i, m in enumerate(CHATS)))
    # stacked weights, batch 8: the executables the module's Generator already compiled
    assert cli.main(["generate", "--model", snap, "--chat", str(src), "--max-new-tokens", "12",
                     "--layers", "stacked", "--batch-size", "8"]) == 0
    rows = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    ref = AutoTokenizer.from_pretrained(snap)
    ids = [ref.apply_chat_template(m, add_generation_prompt=True, return_dict=False)
           for m in CHATS]
    for i, want in enumerate(offline(generator, ids, 12)):
        assert rows[f"c{i}"]["completion_ids"] == want.ids
        assert rows[f"c{i}"]["completion"] == want.text


@pytest.mark.parametrize("line,message", [
    ({"id": 1, "prompt": "hi"}, 'chat.jsonl:1: --chat lines hold "messages"'),
    ({"id": 1, "messages": [{"role": "doctor", "content": "hi"}]}, "message 0 has role 'doctor'"),
    ({"id": 1, "messages": CHAT, "extra": 1}, "unknown field 'extra'"),
])
def test_generate_chat_bad_lines(snap, tmp_path, capsys, line, message):
    from cli import main as cli
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(line) + "\n")
    assert cli.main(["generate", "--model", snap, "--chat", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_generate_chat_base_model_is_refused(tiny_hf_dir, tmp_path, capsys):
    from cli import main as cli
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"id": 1, "messages": CHAT}) + "\n")
    assert cli.main(["generate", "--model", tiny_hf_dir, "--chat", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--chat:" in err and "no chat template (a base model)" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "--chat FILE.jsonl" in capsys.readouterr().out


# ---- a full queue, and the command itself ------------------------------------------------------
def test_full_queue_gets_429(served):
    """The engine's queue bounded at one waiting request: of 12 simultaneous requests
    (4 slots), the ones that find it full get 429 with an OpenAI error body; the others
    are answered in full."""
    running, service, engine = served
    saved, engine.queue_size = engine.queue_size, 1
    # 300 greedy tokens (no eos before): the first admitted hold their slots for 300 steps
    body = {"model": "tiny-chat", "prompt": PROMPTS[5], "max_tokens": 300, "temperature": 0}
    start = threading.Barrier(12, timeout=WAIT)

    def post(_):
        start.wait()
        return _post(running.url, "/v1/completions", body)

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12), timeout=WAIT))
    finally:
        engine.queue_size = saved
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 300
    texts = {r.json()["choices"][0]["text"] for r in answers if r.status_code == 200}
    assert len(texts) == 1   # the same greedy answer for each accepted request


def _lines_until(stream, needle: str, deadline: float) -> str:
    """Read a child's stderr until a line contains ``needle`` (bounded)."""
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in the server's output:\n{''.join(seen)}")


def test_sigterm_finishes_in_flight_and_exits_0(served, snap, jax_cache):
    """The command in a child process (the module's model and settings: its executables
    come from the compilation cache): it says where it listens (loopback), a stream in
    flight when SIGTERM arrives runs to its end, new connections are refused, exit 0."""
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--model", snap, "--port", "0", *SERVE_FLAGS],
        cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = _lines_until(proc.stderr, "listening on", time.monotonic() + WAIT)
        assert "http://127.0.0.1:" in line and "loopback only" in line
        url = line.split("listening on ")[1].split()[0]
        body = {"model": "tiny-chat", "prompt": PROMPTS[2], "max_tokens": 100,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT) as r:
            lines = (x for x in r.iter_lines() if x)
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            events += list(lines)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] >= 1
        assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == _post(served[0].url, "/v1/completions", {
            **body, "stream": False, "stream_options": None}).json()["choices"][0]["text"]
        deadline = time.monotonic() + WAIT
        while True:  # the listening socket is closed
            try:
                httpx.get(url + "/health", timeout=5)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        assert proc.wait(timeout=WAIT) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)


def test_serve_help_and_bad_options_are_one_line(tiny_hf_dir, capsys):
    from cli import main as cli
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ["--model PATH", "--mesh SPEC", "--host HOST", "--port N", "--slots N",
                 "--queue-size N", "--max-len N", "--quantize SCHEME", "--attention"]:
        assert flag in text, flag
    assert "(default: 127.0.0.1)" in " ".join(text.split())
    assert cli.main(["serve", "--model", tiny_hf_dir, "--slots", "0"]) == 2
    assert capsys.readouterr().err.strip() == "meditron-jax serve: error: --slots must be >= 1, got 0"
    taken = serve_cli.bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", tiny_hf_dir, "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--port {port}: cannot bind (address already in use" in err
        assert len(err.splitlines()) == 1
    finally:
        taken.close()


def test_bench_serve_load_reports_figures(served, tmp_path, capsys):
    """bench/serve_load.py against the module's server: every request answered, and the
    figures are consistent (TTFT <= latency, tokens/s = tokens / wall)."""
    from bench import serve_load
    running, *_ = served
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p.replace("\n", " ") + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "load.json"
    assert serve_load.main(["--url", running.url, "--requests", "8", "--concurrency", "4",
                            "--max-tokens", "8", "--prompts", str(prompts),
                            "--json", str(out), "--timeout", str(WAIT)]) == 0
    fig = json.loads(out.read_text())
    assert fig["ok"] == 8 and fig["errors"] == 0 and fig["model"] == "tiny-chat"
    assert 1 <= fig["output_tokens"] <= 64
    assert fig["tokens_per_s"] == pytest.approx(fig["output_tokens"] / fig["wall_s"])
    assert 0 < fig["ttft_p50_s"] <= fig["latency_p50_s"] <= fig["latency_p95_s"]
    assert "latency p50=" in capsys.readouterr().out
    assert serve_load.main(["--url", "http://127.0.0.1:9", "--timeout", "5"]) == 2


def test_a_shared_system_prompt_is_reused_with_the_same_answers(snap, served, tmp_path):
    """bench/serve_load.py with one system text before every prompt, against this module's
    server (no prefix reuse) and a second one with reuse on: the same answers (every
    text, by outputs_sha256), and the second reused the system text's keys (hits and
    tokens counted in /health)."""
    from bench import serve_load
    running, *_ = served
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in SEEDS[:3]))
    flags = [f for f in SERVE_FLAGS if f != "--no-prefix-cache"]
    app, _, engine, _ = serve_cli.build(serve_args("--model", snap, *flags))
    assert engine.prefix is not None
    reusing = Running(app)
    try:
        figures = []
        for url in (running.url, reusing.url, reusing.url):
            out = tmp_path / "load.json"
            assert serve_load.main(["--url", url, "--requests", "8", "--concurrency", "4",
                                    "--max-tokens", "8", "--prompts", str(prompts),
                                    "--system", SEEDS[3] + " " + PROMPTS[5],
                                    "--json", str(out), "--timeout", str(WAIT)]) == 0
            figures.append(json.loads(out.read_text()))
        health = httpx.get(reusing.url + "/health", timeout=WAIT).json()["engine"]
    finally:
        reusing.close()
    assert all(f["ok"] == 8 for f in figures) and figures[0]["system_chars"] > 100
    assert len({f["outputs_sha256"] for f in figures}) == 1
    # the first load's first call of 4 rows finds nothing; every later request hits
    assert health["prefix_hits"] >= 12 and health["prefix_tokens_reused"] >= 12 * 48


def test_quantize_int8_serves_int8_weights(snap, served):
    """``serve --quantize int8``: the engine and the prompt scorer run the int8 tree
    (meditron_jax.model.quant), and prompt log-probs stay within int8's error of the
    float32 server's (the same request to both)."""
    from fastapi.testclient import TestClient
    running, *_ = served
    body = {"model": "tiny-chat", "prompt": PROMPTS[1], "max_tokens": 0, "echo": True,
            "logprobs": 1}
    want = _post(running.url, "/v1/completions", body).json()["choices"][0]["logprobs"]
    app, service, engine, _ = serve_cli.build(serve_args("--model", snap, *SERVE_FLAGS,
                                                         "--quantize", "int8"))
    assert engine.runner.quantize == "int8" and service.scorer.quantize == "int8"
    with TestClient(app) as http:
        got = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert not engine.running
    assert got["tokens"] == want["tokens"]
    diff = np.abs(np.array(got["token_logprobs"][1:]) - np.array(want["token_logprobs"][1:]))
    assert 0 < diff.max() < 0.25   # int8 moved them, a little


class _FakeHandle:
    def __init__(self, completion=None):
        self.done, self.completion, self.cancelled = completion is not None, completion, False

    def cancel(self):
        self.cancelled = True


class _FakeEngine:
    """Refuses as the real engine does when its queue is full or it is stopping, or
    fails without a word (its loop died): the HTTP layer's answers to each."""

    def __init__(self, mode):
        self.mode, self.handles = mode, []

    def submit(self, request, on_event=None):
        from infer.batching import EngineStopped, QueueFull
        from infer.engine import Completion
        if self.mode == "full" and self.handles:   # the first is queued, the second is not
            raise QueueFull("queue full")
        if self.mode == "stopped":
            raise EngineStopped("stopping")
        handle = _FakeHandle(Completion([], "error") if self.mode == "error" else None)
        self.handles.append(handle)
        return handle


@pytest.mark.parametrize("mode,status,code", [("full", 429, "queue_full"),
                                              ("stopped", 503, "shutting_down"),
                                              ("error", 500, "engine_error")])
def test_engine_refusals_and_failures(mode, status, code):
    """Without a model: a request of two prompts whose second finds the queue full gets
    429 and its first engine request is cancelled; a stopping engine 503; an engine whose
    loop died 500 (not a request waiting forever)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient
    from infer.batching import EngineRequest, EngineStopped, QueueFull
    from serve.app import EngineApi, Service, create_app
    model = SimpleNamespace(cfg=SimpleNamespace(vocab_size=100), eos_ids=(2,), tokenizer=None)
    engine = _FakeEngine(mode)
    service = Service(model, EngineApi(engine, EngineRequest, QueueFull, EngineStopped),
                      name="fake", max_len=64)
    with TestClient(create_app(service)) as http:
        r = http.post("/v1/completions", json={"model": "fake", "prompt": [[1, 5], [1, 6]],
                                                "max_tokens": 4})
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert not service.active
    if mode == "full":
        assert len(engine.handles) == 1 and engine.handles[0].cancelled
