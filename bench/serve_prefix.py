"""``python -m bench.serve_prefix``: prefix reuse in the server, measured with and without.

A random benchmark model (``--preset small``: transformers' init with a byte-level BPE
trained on the bundled texts, as ``bench/prefix_eval.py`` builds it, its vocabulary cut
to the tokenizer's so that every generated id is text) is served twice by
``meditron-jax serve`` (a fresh process each, warmed up before it listens), once with
``--no-prefix-cache`` and once with reuse on, and each time driven by
``bench/serve_load.py`` with the same load: ``--requests`` greedy streamed completions,
``--concurrency`` in flight, every prompt behind one shared system text (the first
``--system-chars`` characters of the bundled clinical corpus). Reported per mode: wall
time, output tokens/s, latency and time-to-first-token p50/p95, and the engine's
counters from ``/health`` (prefix hits, prompt tokens not recomputed, compilations
during the load, which must be 0); then the speed-up and whether every answer was
identical (``outputs_sha256``).

    python -m bench.serve_prefix --workdir /tmp/serve_prefix [--preset small]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from bench import prefix_eval, serve_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def system_text(chars: int) -> str:
    """The first ``chars`` characters of the bundled corpus, cut at a word boundary."""
    with open(os.path.join(prefix_eval.data_dir(), "clinical_corpus.txt"), encoding="utf-8") as f:
        text = " ".join(f.read(chars + 200).split())
    return text[:chars].rsplit(" ", 1)[0]


class Server:
    """``meditron-jax serve`` in a child process on a free loopback port."""

    def __init__(self, model_dir: str, flags: list[str], timeout: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--model", model_dir, "--port", "0", *flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        deadline, self.log = time.monotonic() + timeout, []
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.close()
                tail = " | ".join(self.log[-3:])
                raise RuntimeError(f"the server did not start within {timeout:g} s: {tail}")
            self.log.append(line.strip())
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
                return

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as resp:
            return json.load(resp)

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def measure(model_dir: str, reuse: bool, system: str, args) -> dict:
    flags = ["--slots", str(args.slots), "--max-len", str(args.max_len)]
    if not reuse:
        flags.append("--no-prefix-cache")
    started = time.perf_counter()
    server = Server(model_dir, flags, args.timeout)
    try:
        warm = time.perf_counter() - started
        before = server.health()["engine"]
        out = os.path.join(args.workdir, f"load-{'with' if reuse else 'without'}.json")
        code = serve_load.main(["--url", server.url, "--requests", str(args.requests),
                                "--concurrency", str(args.concurrency),
                                "--max-tokens", str(args.max_tokens), "--system", system,
                                "--timeout", str(args.timeout), "--json", out])
        after = server.health()["engine"]
    finally:
        exit_code = server.close()
    if code != 0:
        raise RuntimeError("the load run failed (see above)")
    with open(out, encoding="utf-8") as f:
        figures = json.load(f)
    figures.update(start_and_warmup_s=warm, server_exit=exit_code,
                   compiles_during_load=after["compilations"] - before["compilations"],
                   prefix_hits=after.get("prefix_hits", 0),
                   prefix_tokens_reused=after.get("prefix_tokens_reused", 0))
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_prefix",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="where the model snapshot is built (once) and the figures written")
    p.add_argument("--preset", default="small", help="bench preset (bench/presets.py)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary to train")
    p.add_argument("--requests", type=int, default=32, help="requests per mode")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--system-chars", type=int, default=1500,
                   help="characters of the shared system text")
    p.add_argument("--slots", type=int, default=8, help="the server's --slots")
    p.add_argument("--max-len", type=int, default=512, help="the server's --max-len")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="bound on the server's start (warm-up included) and each request")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.requests, args.concurrency, args.max_tokens, args.system_chars) < 1:
        p.error("--requests, --concurrency, --max-tokens and --system-chars must be >= 1")
    os.makedirs(args.workdir, exist_ok=True)
    from tokenizers import Tokenizer
    model_dir = prefix_eval.prepare(args.workdir, args.preset, args.vocab, model_vocab=True)
    system = system_text(args.system_chars)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    result = {"preset": args.preset, "requests": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "system_tokens": len(tok.encode(system).ids), "loadavg_before": os.getloadavg()}
    try:
        for reuse in (False, True):
            label = "with" if reuse else "without"
            result[label] = measure(model_dir, reuse, system, args)
    except RuntimeError as exc:
        print(f"serve_prefix: error: {exc}", file=sys.stderr)
        return 1
    w, wo = result["with"], result["without"]
    result.update(speedup=wo["wall_s"] / w["wall_s"],
                  identical_outputs=w["outputs_sha256"] == wo["outputs_sha256"],
                  loadavg_after=os.getloadavg())
    print(f"system prompt {result['system_tokens']} tokens; reuse off {wo['wall_s']:.1f} s, "
          f"on {w['wall_s']:.1f} s: {result['speedup']:.2f}x; {w['prefix_hits']} hits, "
          f"{w['prefix_tokens_reused']} prompt tokens reused; identical outputs: "
          f"{result['identical_outputs']}; compilations during the loads: "
          f"{wo['compiles_during_load']} / {w['compiles_during_load']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0 if result["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
