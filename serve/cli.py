"""``meditron-jax serve``: the OpenAI-compatible server (see :mod:`serve.app`).

Binds 127.0.0.1 unless ``--host`` says otherwise, and says where it listens. SIGTERM
(or Ctrl-C) stops accepting connections, lets the requests in flight finish (streams
included), drains the engine and exits 0.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import time

from infer.cli_common import add_model_arguments, inference_mesh, load_for_inference
from meditron_jax.errors import UserError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 accepts other machines (there is no "
                             "authentication: put a proxy in front)")
    parser.add_argument("--port", type=int, default=8000, metavar="N",
                        help="TCP port; 0 picks a free one (printed at start)")
    parser.add_argument("--slots", type=int, default=8, metavar="N",
                        help="sequences decoded together (continuous batching: a finished "
                             "one's slot takes the next queued request)")
    parser.add_argument("--queue-size", type=int, default=64, metavar="N",
                        help="requests waiting for a slot; beyond it the server answers 429")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="context per slot (prompt + completion tokens); default: the "
                             "model's max length")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="the model name clients send (the 'model' field); default: "
                             "the --model directory's name")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="do not reuse the KV cache of prompt prefixes seen before")
    parser.add_argument("--no-warmup", action="store_true",
                        help="start listening before compiling (the first requests wait "
                             "for the compilation)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every HTTP request (uvicorn's access log) to stderr")


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.slots < 1:
        raise UserError(f"--slots must be >= 1, got {args.slots}")
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be >= 1, got {args.queue_size}")
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len must be >= 2, got {args.max_len}")


def build(args: argparse.Namespace):
    """(FastAPI app, Service, engine, warm-up seconds) for ``args``; the engine
    compiled (unless --no-warmup) and started."""
    from meditron_jax.tokenizer.chat import ChatTemplate
    from serve.app import EngineApi, Service, create_app
    from serve.scoring import PromptScorer
    try:
        from infer.batching import (ContinuousEngine, EngineRequest, EngineStopped,
                                     QueueFull)
    except ImportError:
        raise UserError("serve needs the continuous-batching engine (infer/batching.py), "
                        "which this installation lacks") from None
    check_args(args)
    mesh = inference_mesh(args)
    import jax
    if jax.process_count() > 1:
        raise UserError("serve runs on one host's devices; a multi-host mesh is not "
                        "supported (see the README's serving section)")
    if mesh is not None:
        from sharding import INFER_RULES, check_batch
        check_batch(args.slots, mesh, INFER_RULES)
    model, mesh = load_for_inference(args, mesh)
    limit = model.cfg.max_position_embeddings
    if args.max_len is not None and args.max_len > limit:
        raise UserError(f"--max-len {args.max_len} exceeds the model's max length {limit}")
    try:
        template, template_error = ChatTemplate.from_dir(model.path), None
    except UserError as exc:
        template, template_error = None, str(exc)
    engine = ContinuousEngine(model, mesh, slots=args.slots, max_len=args.max_len,
                              attention=args.attention, queue_size=args.queue_size,
                              prefix_cache=not args.no_prefix_cache)
    service = Service(
        model, EngineApi(engine, EngineRequest, QueueFull, EngineStopped),
        name=args.name or os.path.basename(os.path.normpath(args.model)),
        max_len=min(args.max_len or engine.max_len, engine.max_len),
        template=template, template_error=template_error,
        scorer_factory=lambda: PromptScorer(model, mesh, args.batch_size,
                                            attention=args.attention))
    start = time.perf_counter()
    if not args.no_warmup:
        engine.warmup(logprobs=True)
        service.scorer  # noqa: B018 (built now; it compiles per prompt bucket on use)
    warm = time.perf_counter() - start
    engine.start()
    stopped = []

    def stop():  # once: at the server's shutdown, or by run() if the server never started
        if not stopped:
            stopped.append(True)
            engine.stop(drain=True)

    app = create_app(service, on_shutdown=stop)
    service.stop_engine = stop
    return app, service, engine, warm


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = ("address already in use; pick another --port" if exc.errno == errno.EADDRINUSE
                  else exc.strerror or str(exc))
        raise UserError(f"--host {host} --port {port}: cannot bind ({reason})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, access_log: bool = False):
    import uvicorn
    config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=None,
                            lifespan="on")
    return uvicorn.Server(config)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    sock = bind(args.host, args.port)  # before loading: a taken port fails at once
    app, service, engine, warm = build(args)
    try:
        if not args.no_warmup:
            print(f"meditron-jax serve: warm-up (compiling) took {warm:.1f} s",
                  file=sys.stderr, flush=True)
        host, port = sock.getsockname()[:2]
        scope = ("loopback only; --host 0.0.0.0 to accept other machines"
                 if args.host in LOOPBACK else "reachable from other machines; no authentication")
        chat = ("chat template " + service.template.source if service.template is not None
                else "no chat template: /v1/chat/completions answers 400")
        print(f"meditron-jax serve: model {service.name!r} ({chat}); slots={args.slots} "
              f"queue={args.queue_size} max_len={service.max_len}", file=sys.stderr)
        url_host = f"[{host}]" if ":" in host else host
        print(f"meditron-jax serve: listening on http://{url_host}:{port} ({scope}); "
              "SIGTERM or Ctrl-C stops after the requests in flight", file=sys.stderr,
              flush=True)
        server = uvicorn_server(app, args.access_log)
        # uvicorn re-raises the signal that stopped it once it has shut down; with this
        # handler in place underneath, that re-raise is a no-op and the exit code is 0.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        service.stop_engine()
        sock.close()
    print(f"meditron-jax serve: stopped ({service.cancelled} requests cancelled by their "
          "clients)", file=sys.stderr, flush=True)
    return 0


