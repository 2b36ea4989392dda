"""The OpenAI wire format: request bodies checked field by field, responses built.

Every check names the field (``param``) and answers HTTP 400 with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; unknown fields are refused, not
ignored (a misspelt ``max_token`` would otherwise silently mean the default). Fields
OpenAI defines but this server cannot honour (``n`` > 1, penalties, ``logit_bias``)
are accepted only at their neutral value.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any

from infer.sampling import Sampling
from meditron_jax.errors import UserError

MAX_STOP = 16             # stop strings per request
MAX_COMPLETION_LOGPROBS = 5   # /v1/completions "logprobs" (OpenAI's limit)
MAX_CHAT_LOGPROBS = 20        # /v1/chat/completions "top_logprobs" (OpenAI's limit)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                 "stream", "stream_options", "n", "user", "presence_penalty",
                 "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs",
                               "max_completion_tokens"}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (
            message, status, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class GenParams:
    max_tokens: int | None          # None: the rest of the context (chat only)
    sampling: Sampling
    seed: int
    stop: tuple[str, ...]
    logprobs: int | None            # None: no log-probs; k: each token's and k alternatives
    stream: bool
    include_usage: bool


@dataclasses.dataclass
class CompletionBody:
    model: str
    prompts: list                   # each a str or a list of token ids
    echo: bool
    params: GenParams


@dataclasses.dataclass
class ChatBody:
    model: str
    messages: list[dict]
    params: GenParams


# ---- parsing ---------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON ({exc})", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(body)}",
                       code="invalid_json")
    return body


def parse_completion(body: dict) -> CompletionBody:
    _check_fields(body, COMPLETION_FIELDS)
    _neutral(body, best_of=1, suffix=None)
    echo = _bool(body, "echo", False)
    logprobs = _int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    params = _common(body, logprobs, default_max=DEFAULT_COMPLETION_TOKENS,
                     min_max_tokens=0 if echo else 1)
    return CompletionBody(model=_model(body), prompts=_prompts(body), echo=echo, params=params)


def parse_chat(body: dict) -> ChatBody:
    _check_fields(body, CHAT_FIELDS)
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise ApiError("give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_CHAT_LOGPROBS)
    if top is not None and not want:
        raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
    params = _common(body, (top or 0) if want else None, default_max=None, min_max_tokens=1)
    return ChatBody(model=_model(body), messages=_messages(body), params=params)


def _check_fields(body: dict, known: set[str]) -> None:
    for key in body:
        if key not in known:
            raise ApiError(f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_field")


def _model(body: dict) -> str:
    if "model" not in body:
        raise ApiError("you must provide a model parameter", param="model")
    model = body["model"]
    if not isinstance(model, str):
        raise ApiError(f"model must be a string, got {_kind(model)}", param="model")
    return model


def _common(body: dict, logprobs: int | None, *, default_max: int | None,
            min_max_tokens: int) -> GenParams:
    _neutral(body, n=1, presence_penalty=0, frequency_penalty=0)
    if body.get("logit_bias"):
        raise ApiError("logit_bias is not supported; leave it out", param="logit_bias")
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise ApiError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = _int(body, "top_k", 0, -1, None)
    seed = _int(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    stream = _bool(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError("stream_options goes with stream: true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError('stream_options must be {"include_usage": true|false}',
                           param="stream_options")
        include_usage = _bool(options, "include_usage", False, param="stream_options")
    try:
        sampling = Sampling(temperature=temperature, top_k=max(top_k, 0), top_p=top_p)
    except UserError as exc:  # belt and braces: the checks above should catch it first
        raise ApiError(str(exc).replace("--", "").replace("-", "_")) from None
    return GenParams(
        max_tokens=_int(body, "max_tokens", default_max, min_max_tokens, None),
        sampling=sampling,
        seed=secrets.randbits(32) if seed is None else seed % (1 << 32),
        stop=_stop(body), logprobs=logprobs, stream=stream, include_usage=include_usage)


def _prompts(body: dict) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of ids."""
    if "prompt" not in body:
        raise ApiError("you must provide a prompt parameter", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(x) for x in prompt):
            return [list(prompt)]
        if all(isinstance(x, str) for x in prompt):
            return list(prompt)
        if all(isinstance(x, list) and x and all(_is_int(i) for i in x) for x in prompt):
            return [list(x) for x in prompt]
    raise ApiError("prompt must be a string, a list of strings, a non-empty list of token "
                   "ids, or a list of such lists", param="prompt")


def _messages(body: dict) -> list[dict]:
    """Messages as chat templates take them: text content parts joined into a string."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError('messages must be a non-empty list of {"role", "content"} objects',
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object, got {_kind(m)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(f"messages[{i}].content: only text parts "
                               '({"type": "text", "text": ...}) are supported',
                               param="messages")
            m = {**m, "content": "".join(p["text"] for p in content)}
        out.append(m)
    return out


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(f"at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError("stop strings must not be empty", param="stop")
    return tuple(stops)


def _neutral(body: dict, **neutral) -> None:
    for name, value in neutral.items():
        got = body.get(name)
        if got is not None and got != value:
            raise ApiError(f"{name}={json.dumps(got)} is not supported; leave it out or "
                           f"give {json.dumps(value)}", param=name)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(body: dict, name: str, default, lo: int | None, hi: int | None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ApiError(f"{name} must be an integer, got {_kind(value)}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"between {lo} and {hi}" if hi is not None else f">= {lo}")
        raise ApiError(f"{name} must be {bounds}, got {value}", param=name)
    return value


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ApiError(f"{name} must be a number, got {_kind(value)}", param=name)
    if not lo <= value <= hi:
        raise ApiError(f"{name} must be between {lo:g} and {hi:g}, got {value}", param=name)
    return float(value)


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {_kind(value)}",
                       param=param or name)
    return value


def _kind(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
