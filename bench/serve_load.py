"""A bounded load test against a running ``meditron-jax serve`` (or any OpenAI-compatible
server): ``--requests`` streamed completions, at most ``--concurrency`` in flight,
every one bounded by ``--timeout``. Reports latency p50/p95 (request sent to last byte),
time to first token p50/p95 (to the first chunk with text), output tokens/s over the
run (the server's ``usage`` counts), and 429s/errors. ``--system`` puts one shared text
before every prompt (a system message with ``--chat``), the case prefix reuse is for;
``outputs_sha256`` hashes every answer's text in request order, so two runs (reuse on
and off, say) can be checked for identical outputs.

    meditron-jax serve --model ckpt/ --slots 8 &
    python -m bench.serve_load --url http://127.0.0.1:8000 --requests 64 --concurrency 16

Standard library only (no client package needed on the load machine).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), os.pardir, "meditron_jax", "data",
                               "clinical_prompts.txt")


@dataclasses.dataclass
class Result:
    status: int                 # HTTP status (0: no answer)
    latency: float = 0.0        # seconds, request to last byte
    ttft: float | None = None   # seconds to the first chunk carrying text
    tokens: int = 0             # completion tokens (the server's usage)
    error: str = ""
    text: str = ""               # the answer, streamed chunks joined


def one_request(url: str, body: dict, timeout: float, chat: bool) -> Result:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    result = Result(status=0)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result.status = resp.status
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta", {}).get("content") if chat
                            else choice.get("text"))
                    if text and result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    result.text += text or ""
    except urllib.error.HTTPError as exc:
        result.status, result.error = exc.code, exc.read().decode("utf-8", "replace")[:200]
    except (OSError, ValueError) as exc:   # refused, reset, timed out, bad JSON
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200 and not r.error]
    texts = json.dumps([r.text if r.status == 200 and not r.error else None
                        for r in results]).encode()
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "ok": len(ok),
            "rejected_429": sum(r.status == 429 for r in results),
            "errors": sum(r.status not in (200, 429) or bool(r.error and r.status == 200)
                          for r in results),
            "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "outputs_sha256": hashlib.sha256(texts).hexdigest(),
            "empty_answers": sum(not r.text for r in ok)}


def server_model(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=timeout) as resp:
        return json.load(resp)["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name; default: the server's first")
    p.add_argument("--requests", type=int, default=64, metavar="N", help="requests in all")
    p.add_argument("--concurrency", type=int, default=8, metavar="C",
                   help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help="one prompt a line, used round robin")
    p.add_argument("--chat", action="store_true",
                   help="send the prompts as user messages to /v1/chat/completions")
    p.add_argument("--system", default="", metavar="TEXT",
                   help="a text shared by every request, before its prompt (a system "
                        "message with --chat)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="bound on each request, and on reaching the server")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        p.error("--requests, --concurrency and --max-tokens must be >= 1")
    try:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        p.error(f"--prompts {args.prompts}: {exc.strerror}")
    if not prompts:
        p.error(f"--prompts {args.prompts}: no prompts")
    url = args.url.rstrip("/")
    try:
        model = args.model or server_model(url, args.timeout)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"serve_load: error: no OpenAI-compatible server at {url} ({exc})",
              file=sys.stderr)
        return 2

    def body(i: int) -> dict:
        text = prompts[i % len(prompts)]
        out = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
               "stream": True, "stream_options": {"include_usage": True}, "seed": i}
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            out["messages"] = system + [{"role": "user", "content": text}]
        else:
            out["prompt"] = f"{args.system}\n\n{text}" if args.system else text
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one_request, url, body(i), args.timeout, args.chat)
                   for i in range(args.requests)]
        results = [f.result() for f in futures]
    figures = {"url": url, "model": model, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "chat": args.chat,
               "system_chars": len(args.system),
               **summarize(results, time.perf_counter() - start)}
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"requests={figures['requests']} ok={figures['ok']} 429={figures['rejected_429']} "
          f"errors={figures['errors']} concurrency={args.concurrency} wall={fmt(figures['wall_s'])}s")
    print(f"latency p50={fmt(figures['latency_p50_s'])}s p95={fmt(figures['latency_p95_s'])}s  "
          f"ttft p50={fmt(figures['ttft_p50_s'])}s p95={fmt(figures['ttft_p95_s'])}s  "
          f"output tokens={figures['output_tokens']} tokens/s={fmt(figures['tokens_per_s'])}")
    errors = [r.error for r in results if r.error and r.status != 429]
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
