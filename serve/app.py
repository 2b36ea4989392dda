"""The FastAPI application: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/models``, and ``/health``, over a continuous-batching engine.

The engine runs its decode loop in its own thread and calls ``on_event`` there; each
request's events are handed to the event loop with ``call_soon_threadsafe`` and read
from an ``asyncio.Queue`` (nothing here blocks the loop). A request the engine cannot
queue (``QueueFull``) is answered 429; a client that goes away, mid-stream or while
waiting, has its engine requests cancelled, which frees their slots at the next step.
Streaming text goes through :class:`infer.generate_cli.TextStream` (text that could
still change, a partial character or the start of a stop string, is held back), and
the last chunk completes it to the engine's final text, so the chunks concatenate to
the non-streaming answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import secrets
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from infer.engine import Completion
from infer.generate_cli import TextStream
from meditron_jax.errors import UserError
from serve.protocol import (ApiError, ChatBody, CompletionBody, GenParams, parse_chat,
                            parse_completion, parse_json)

DISCONNECT_POLL_S = 0.25   # how often a waiting request checks that its client is still there


ENGINE_COUNTERS = ("compilations", "prefix_hits", "prefix_tokens_reused", "seconds")


@dataclasses.dataclass
class EngineApi:
    """The names used from :mod:`infer.batching`, passed in so that tests can
    drive the HTTP layer with a stand-in engine."""
    engine: Any
    request_cls: Callable     # EngineRequest
    queue_full: type          # QueueFull
    stopped: type = RuntimeError  # EngineStopped: submit() while shutting down


class Service:
    """What the routes share: the model, its engine, chat template and prompt scorer."""

    def __init__(self, model, api: EngineApi, *, name: str, max_len: int,
                 template=None, template_error: str | None = None,
                 scorer_factory: Callable[[], Any] | None = None):
        self.model, self.api, self.name, self.max_len = model, api, name, max_len
        self.tokenizer = model.tokenizer
        self.template, self.template_error = template, template_error
        self._scorer_factory, self._scorer = scorer_factory, None
        self.created = int(time.time())
        self.active: set = set()          # engine handles not finished
        self.cancelled = 0                # engine requests cancelled for a client gone
        self.draining = False
        self._token_text: dict[int, str] = {}

    # ---- prompts -------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(f"The model `{model}` does not exist; this server serves "
                           f"`{self.name}`", status=404, param="model", code="model_not_found")

    def encode_prompt(self, prompt, param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(f"{self.name} has no tokenizer; send the prompt as token ids",
                               param=param)
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.model.cfg.vocab_size
            bad = [i for i in prompt if not 0 <= i < vocab]
            if bad:
                raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                               param=param)
            ids = list(prompt)
        if not ids:
            raise ApiError("empty prompt; give at least one token", param=param)
        return ids

    def budget(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens checked against the context (``None``: all the room left)."""
        room = self.max_len - len(ids)
        wanted = room if max_tokens is None else max_tokens
        if wanted > room or room < (1 if max_tokens is None else 0):
            raise ApiError(
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {len(ids) + wanted} tokens ({len(ids)} in the {param}, {wanted} "
                "for the completion). Please reduce the length of the prompt or the "
                "completion.", param=param, code="context_length_exceeded")
        return wanted

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if self.template is None:
            raise ApiError(f"{self.name} has no chat template ({self.template_error}); "
                           "/v1/chat/completions needs one: send the text to /v1/completions",
                           param="messages", code="no_chat_template")
        if self.tokenizer is None:
            raise ApiError(f"{self.name} has no tokenizer; chat needs one", param="messages")
        try:
            return self.template.encode_chat(self.tokenizer, messages,
                                             add_generation_prompt=True)
        except UserError as exc:
            raise ApiError(str(exc), param="messages") from None

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = (self.tokenizer.decode([token], skip_special_tokens=False)
                    if self.tokenizer is not None else f"<{token}>")
            self._token_text[token] = text
        return text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    @property
    def scorer(self):
        if self._scorer is None:
            if self._scorer_factory is None:
                raise ApiError("prompt log-probs (echo with logprobs) are not available here",
                               param="echo")
            self._scorer = self._scorer_factory()
        return self._scorer

    # ---- the engine ----------------------------------------------------------------------
    def submit(self, requests: list) -> "Submitted":
        return Submitted(self, requests)


class Submitted:
    """Engine requests of one HTTP request; their events, in order, on an asyncio queue."""

    def __init__(self, service: Service, requests: list):
        self.service, self.loop = service, asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.finished = [False] * len(requests)
        api = service.api
        try:
            for i, request in enumerate(requests):
                handle = api.engine.submit(request, on_event=functools.partial(self._event, i))
                self.handles.append(handle)
                service.active.add(handle)
        except api.queue_full:
            self.cancel(count=False)
            raise ApiError("the server's request queue is full; retry later", status=429,
                           type="rate_limit_error", code="queue_full") from None
        except UserError as exc:
            self.cancel(count=False)
            raise ApiError(str(exc)) from None
        except api.stopped:
            self.cancel(count=False)
            raise ApiError("the server is shutting down", status=503, type="server_error",
                           code="shutting_down") from None
        except Exception:
            self.cancel(count=False)
            raise

    def _event(self, i: int, event) -> None:  # the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

    @property
    def done(self) -> bool:
        return all(self.finished)

    async def next(self, request) -> tuple[int, Any]:
        """The next (index, event); cancels everything if the client has gone."""
        while True:
            try:
                i, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise ClientGone() from None
                for i, handle in enumerate(self.handles):  # a failed engine emits nothing
                    c = handle.completion if handle.done else None
                    if not self.finished[i] and getattr(c, "finish_reason", None) == "error":
                        self.cancel(count=False)
                        raise ApiError("the generation engine failed; see the server's log",
                                       status=500, type="server_error", code="engine_error")
                continue
            if event.finish_reason is not None:
                self.finished[i] = True
                self.service.active.discard(self.handles[i])
            return i, event

    def cancel(self, count: bool = True) -> None:
        for i, handle in enumerate(self.handles):
            if not self.finished[i] and not handle.done:
                handle.cancel()
                if count:
                    self.service.cancelled += 1
            self.service.active.discard(handle)


class ClientGone(Exception):
    pass


@dataclasses.dataclass
class Choice:
    """One prompt's generation as it arrives."""
    index: int
    prompt_ids: list[int]
    prompt_text: str
    stream: TextStream
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[dict] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion: Any = None

    def add(self, event) -> str:
        """Apply an event; return the new printable text."""
        self.ids += list(event.ids)
        if event.logprobs is not None:
            self.logprobs += list(event.logprobs)
        if event.top_logprobs is not None:
            self.top += list(event.top_logprobs)
        if event.finish_reason is None:
            piece = self.stream.push(list(event.ids))
        else:
            self.completion = event.completion
            self.finish_reason = event.finish_reason
            final = getattr(event.completion, "text", None)
            if final is None:
                final = self.stream.decode(self.completion_ids())
            piece = self.stream.finish(final)
            self.text = final
        return piece

    def completion_ids(self) -> list[int]:
        c = self.completion
        return list(c.ids) if c is not None else self.ids


# ---- the application ---------------------------------------------------------------------------
def create_app(service: Service, *, on_startup=None, on_shutdown=None):

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            service.draining = True
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="meditron-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(str(exc.detail), status=exc.status_code,
                                     code=str(exc.status_code)).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return JSONResponse(ApiError(f"internal error: {type(exc).__name__}: {exc}",
                                     status=500, type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        engine = service.api.engine   # counters an operator (or a benchmark) reads
        body = {"status": "draining" if service.draining else "ok", "model": service.name,
                "active_requests": len(service.active),
                "engine": {k: getattr(engine, k) for k in ENGINE_COUNTERS if hasattr(engine, k)}}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        service.check_model(model_id)
        return _model_card(service)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_completion(parse_json(await request.body()))
        service.check_model(body.model)
        return await _completions(service, body, request, StreamingResponse)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_chat(parse_json(await request.body()))
        service.check_model(body.model)
        return await _chat(service, body, request, StreamingResponse)

    return app


def _model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": service.created,
            "owned_by": "meditron-jax", "max_model_len": service.max_len}


def _engine_request(service: Service, ids: list[int], params: GenParams, max_new: int,
                    stop_ids=None):
    return service.api.request_cls(ids=ids, max_new_tokens=max_new, sampling=params.sampling,
                                   seed=params.seed, stop_ids=stop_ids,
                                   stop_strings=params.stop, logprobs=params.logprobs)


def _new_stream(service: Service, params: GenParams) -> TextStream:
    return TextStream(service.decode, params.stop)


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(c.prompt_ids) for c in choices)
    completion = sum(len(c.completion_ids()) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _completions(service: Service, body: CompletionBody, request, streaming_cls):
    params = body.params
    prompts = [service.encode_prompt(p) for p in body.prompts]
    budgets = [service.budget(ids, params.max_tokens, "prompt") for ids in prompts]
    texts = [p if isinstance(p, str) else service.decode(ids)
             for p, ids in zip(body.prompts, prompts)]
    scores = None
    if body.echo and params.logprobs is not None:
        scores = await asyncio.to_thread(service.scorer.score, prompts)
    choices = [Choice(i, ids, text, _new_stream(service, params))
               for i, (ids, text) in enumerate(zip(prompts, texts))]
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    generate = params.max_tokens != 0
    if scores is not None and params.max_tokens == 1 and params.sampling.greedy \
            and not params.stop and not params.stream:
        # lm-eval's log-likelihood request: the one greedy token is the prompt pass's
        # argmax after the prompt; no second pass through the engine
        for c in choices:
            _next_token_from_scores(service, c, scores[c.index], params.logprobs)
        generate, sub = True, None
    else:
        sub = service.submit([_engine_request(service, ids, params, n)
                              for ids, n in zip(prompts, budgets)]) if generate else None

    def obj(choice_list, usage=None):
        out = {"id": rid, "object": "text_completion", "created": created,
               "model": service.name, "choices": choice_list}
        if usage is not None:
            out["usage"] = usage
        return out

    def echo_logprobs(c: Choice) -> dict:
        return _completion_logprobs(service, c.prompt_ids, scores[c.index], params.logprobs)

    if params.stream:
        async def events():
            try:
                if body.echo:
                    for c in choices:
                        yield _sse(obj([{"index": c.index, "text": c.prompt_text,
                                         "logprobs": echo_logprobs(c) if scores else None,
                                         "finish_reason": None}]))
                if sub is None:
                    for c in choices:
                        yield _sse(obj([{"index": c.index, "text": "", "logprobs": None,
                                         "finish_reason": "length"}]))
                while sub is not None and not sub.done:
                    i, event = await sub.next(request)
                    c = choices[i]
                    before = len(c.ids)
                    piece = c.add(event)
                    if not piece and event.finish_reason is None:
                        continue
                    lp = None
                    if params.logprobs is not None:
                        lp = _generated_logprobs(service, c, before, len(c.ids), params.logprobs)
                    yield _sse(obj([{"index": i, "text": piece, "logprobs": lp,
                                     "finish_reason": _finish(event.finish_reason)}]))
                if params.include_usage:
                    yield _sse(obj([], _usage(choices)))
                yield b"data: [DONE]\n\n"
            except ClientGone:
                return
            finally:
                if sub is not None and not sub.done:
                    sub.cancel()

        return streaming_cls(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

    try:
        while sub is not None and not sub.done:
            i, event = await sub.next(request)
            choices[i].add(event)
    except ClientGone:
        return None
    finally:
        if sub is not None and not sub.done:
            sub.cancel()
    out = []
    for c in choices:
        text = c.text
        logprobs = None
        if params.logprobs is not None:
            gen = _generated_logprobs(service, c, 0, len(c.ids), params.logprobs)
            if body.echo and not c.ids and c.finish_reason == "stop":
                _add_stop_token(service, gen, scores[c.index], params)
            if body.echo:
                logprobs = echo_logprobs(c)
                offset = len(c.prompt_text)
                for key in ("tokens", "token_logprobs", "top_logprobs"):
                    logprobs[key] += gen[key]
                logprobs["text_offset"] += [offset + o for o in gen["text_offset"]]
            else:
                logprobs = gen
        if body.echo:
            text = c.prompt_text + text
        out.append({"index": c.index, "text": text, "logprobs": logprobs,
                    "finish_reason": _finish(c.finish_reason) if generate else "length"})
    return obj(out, _usage(choices))


async def _chat(service: Service, body: ChatBody, request, streaming_cls):
    params = body.params
    ids = service.chat_ids(body.messages)
    budget = service.budget(ids, params.max_tokens, "messages")
    stop_ids = tuple(dict.fromkeys(tuple(service.model.eos_ids) + tuple(
        service.tokenizer.eos_ids if service.tokenizer is not None else ())))
    choice = Choice(0, ids, "", _new_stream(service, params))
    sub = service.submit([_engine_request(service, ids, params, budget, stop_ids)])
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

    def obj(kind, choice_list, usage=None):
        out = {"id": rid, "object": kind, "created": created, "model": service.name,
               "choices": choice_list}
        if usage is not None:
            out["usage"] = usage
        return out

    if params.stream:
        async def events():
            try:
                yield _sse(obj("chat.completion.chunk", [{
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}]))
                while not sub.done:
                    _, event = await sub.next(request)
                    before = len(choice.ids)
                    piece = choice.add(event)
                    if not piece and event.finish_reason is None:
                        continue
                    lp = None
                    if params.logprobs is not None:
                        lp = _chat_logprobs(service, choice, before, len(choice.ids))
                    delta = {"content": piece} if piece else {}
                    yield _sse(obj("chat.completion.chunk", [{
                        "index": 0, "delta": delta, "logprobs": lp,
                        "finish_reason": _finish(event.finish_reason)}]))
                if params.include_usage:
                    yield _sse(obj("chat.completion.chunk", [], _usage([choice])))
                yield b"data: [DONE]\n\n"
            except ClientGone:
                return
            finally:
                if not sub.done:
                    sub.cancel()

        return streaming_cls(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

    try:
        while not sub.done:
            _, event = await sub.next(request)
            choice.add(event)
    except ClientGone:
        return None
    finally:
        if not sub.done:
            sub.cancel()
    lp = (_chat_logprobs(service, choice, 0, len(choice.ids))
          if params.logprobs is not None else None)
    return obj("chat.completion", [{
        "index": 0, "message": {"role": "assistant", "content": choice.text},
        "logprobs": lp, "finish_reason": _finish(choice.finish_reason)}], _usage([choice]))


def _finish(reason: str | None) -> str | None:
    return reason  # "stop" | "length" (a cancelled request has no client left to tell)


# ---- log-probs in OpenAI's two shapes ----------------------------------------------------------
def _completion_logprobs(service: Service, ids: list[int], score, k: int) -> dict:
    """Echoed prompt: the first token has no log-prob (nothing before it)."""
    tokens = [service.token_text(t) for t in ids]
    top = [None] + [_top_dict(service, alts[:k]) for alts in score.top]
    return {"tokens": tokens, "token_logprobs": [None] + list(score.token_logprobs),
            "top_logprobs": top, "text_offset": _offsets(tokens)}


def _generated_logprobs(service: Service, c: Choice, start: int, end: int, k: int) -> dict:
    end = min(end, len(c.logprobs))
    tokens = [service.token_text(t) for t in c.ids[start:end]]
    tops = [_top_dict(service, list(c.top[i].items())[:k]) if i < len(c.top) else {}
            for i in range(start, end)]
    base = len(service.decode(c.ids[:start])) if start else 0
    return {"tokens": tokens, "token_logprobs": [float(x) for x in c.logprobs[start:end]],
            "top_logprobs": tops, "text_offset": [base + o for o in _offsets(tokens)]}


def _next_token_from_scores(service: Service, c: Choice, score, k: int) -> None:
    """A greedy one-token completion from the prompt pass (a stop id ends it empty)."""
    token, value = score.next_top[0]
    if token in set(service.model.eos_ids):
        c.completion = Completion(ids=[], finish_reason="stop", text="")
    else:
        c.ids, c.logprobs = [token], [value]
        c.top = [dict(score.next_top[:k])]
        c.completion = Completion(ids=[token], finish_reason="length",
                                  text=service.decode([token]))
    c.finish_reason, c.text = c.completion.finish_reason, c.completion.text


def _add_stop_token(service: Service, gen: dict, score, params: GenParams) -> None:
    """A completion that stopped at once, on a stop id: that token's entry, from the
    prompt pass's distribution after the prompt (the engine leaves stop ids out of its
    tokens). lm-eval's log-likelihood requests (``max_tokens: 1``) drop the last entry
    of the list, which must therefore be this one, not a prompt token. Greedy: the stop
    id was the argmax; sampled: the likeliest stop id among the alternatives."""
    stops = set(service.model.eos_ids)
    if params.sampling.greedy:
        picked = score.next_top[:1]
    else:
        picked = [(t, v) for t, v in score.next_top if t in stops][:1]
    if not picked or picked[0][0] not in stops:
        return
    token, value = picked[0]
    gen["tokens"].append(service.token_text(token))
    gen["token_logprobs"].append(value)
    gen["top_logprobs"].append(_top_dict(service, score.next_top[:params.logprobs]))
    gen["text_offset"].append(len(service.decode([])))


def _chat_logprobs(service: Service, c: Choice, start: int, end: int) -> dict:
    end = min(end, len(c.logprobs))
    content = []
    for i in range(start, end):
        text = service.token_text(c.ids[i])
        alts = list(c.top[i].items()) if i < len(c.top) else []
        content.append({"token": text, "logprob": float(c.logprobs[i]),
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": service.token_text(t), "logprob": float(v),
                                          "bytes": list(service.token_text(t).encode())}
                                         for t, v in alts]})
    return {"content": content}


def _top_dict(service: Service, alts) -> dict:
    out: dict[str, float] = {}
    for token, value in alts:
        out.setdefault(service.token_text(token), float(value))
    return out


def _offsets(tokens: list[str]) -> list[int]:
    out, n = [], 0
    for t in tokens:
        out.append(n)
        n += len(t)
    return out
