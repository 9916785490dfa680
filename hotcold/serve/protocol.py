"""The OpenAI request and response shapes: a request body validated into a `GenRequest`, every failure an
`APIError` in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) with its status.

Validation is strict where a wrong value would silently change the answer (n > 1, logprobs, penalties,
a `max_tokens` the context cannot hold) and lenient where clients commonly send harmless extras (`user`,
`presence_penalty: 0`, unknown keys are ignored as OpenAI ignores them).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# OpenAI's limit on stop sequences per request.
MAX_STOP = 4
# OpenAI's documented default `max_tokens` for /v1/completions; chat requests default to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# torch.Generator.manual_seed accepts [-2**63, 2**64).
SEED_RANGE = (-(2**63), 2**64)
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server refuses, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by hotcold serve", code="unsupported_parameter", param=param)


@dataclass
class GenRequest:
    """One validated generation request."""

    kind: str  # "chat" | "completion"
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object encoded as UTF-8",
                       code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            "send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object "
                            "such as {\"model\": ..., \"messages\": [...]}", code="invalid_json")
    return body


# ---- field readers -------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(key, f"'{key}' must be a number, got {json.dumps(v)[:40]}", code="invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise invalid(key, f"'{key}' is {v:g}; it must lie in {interval}")
    return float(v)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(key, f"'{key}' must be true or false, got {json.dumps(v)[:40]}", code="invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "'stop' must be a string or a list of strings", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"'stop' has {len(stops)} sequences; at most {MAX_STOP} are allowed")
    if any(s == "" for s in stops):
        raise invalid("stop", "'stop' contains an empty string; every stop sequence needs at least one character")
    return list(stops)


def _refuse_unsupported(body: dict, kind: str) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        if not _is_int(n) or n < 1:
            raise invalid("n", f"'n' must be a positive integer, got {json.dumps(n)[:40]}")
        raise unsupported("n", f"n={n} (several choices per request)")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise unsupported("logprobs", "logprobs")
    for key in ("frequency_penalty", "presence_penalty"):
        v = body.get(key)
        if v not in (None, 0, 0.0) or isinstance(v, bool):
            raise unsupported(key, f"a non-zero {key}")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "logit_bias")
    if kind == "completion":
        if body.get("echo"):
            raise unsupported("echo", "echo")
        best_of = body.get("best_of")
        if best_of not in (None, 1):
            raise unsupported("best_of", f"best_of={best_of}")
        if body.get("suffix"):
            raise unsupported("suffix", "suffix (fill-in-the-middle)")
    else:
        if body.get("tools") or body.get("functions"):
            raise unsupported("tools", "tool and function calling")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise unsupported("response_format", "a response_format other than text")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("messages", "'messages' is missing; pass a list such as [{\"role\": \"user\", \"content\": \"...\"}]",
                      code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                      code="invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"'{where}' must be an object with 'role' and 'content'", code="invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' is {json.dumps(role)[:40]}; use one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise unsupported(f"{where}.content[{j}]", "a content part other than {\"type\": \"text\", \"text\": ...}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content", f"'{where}.content' must be a string or a list of text parts",
                          code="invalid_type")
        # templates know "system"; OpenAI's newer name for it is "developer"
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt_ids(body: dict, tokenizer: Any, vocab: int) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise invalid("prompt", "'prompt' is missing; pass a string (or a list of token ids)",
                      code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise invalid("prompt", "'prompt' is empty; pass at least one character")
        if tokenizer is None:
            raise invalid("prompt", "this bundle has no tokenizer; pass 'prompt' as a list of token ids")
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise invalid("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise unsupported("prompt", f"a batch of {len(p)} prompts in one request")
    raise invalid("prompt", "'prompt' must be a non-empty string or a non-empty list of token ids", code="invalid_type")


def parse_generation(body: dict, kind: str, model_name: str, tokenizer: Any, vocab: int, max_len: int) -> GenRequest:
    """Validate a /v1/completions (`kind="completion"`) or /v1/chat/completions (`kind="chat"`) body."""
    model = body.get("model")
    if model is None:
        raise invalid("model", f"'model' is missing; this server serves {json.dumps(model_name)}",
                      code="missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", "'model' must be a string", code="invalid_type")
    if model != model_name:
        raise APIError(404, f"the model {json.dumps(model)[:80]} does not exist; this server serves "
                            f"{json.dumps(model_name)} (GET /v1/models lists it)", code="model_not_found", param="model")
    _refuse_unsupported(body, kind)
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise invalid("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}",
                      code="invalid_type")
    include_usage = _bool(so or {}, "include_usage")
    if so is not None and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed with \"stream\": true")
    # OpenAI's defaults (temperature 1, top_p 1): a client that sends neither gets sampling, as from OpenAI
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is None:
        seed = 0
    elif not _is_int(seed):
        raise invalid("seed", f"'seed' must be an integer, got {json.dumps(seed)[:40]}", code="invalid_type")
    elif not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise invalid("seed", f"'seed' {seed} is outside [-2**63, 2**64)")
    stop = _stop(body)

    if kind == "chat":
        msgs = _messages(body)
        if tokenizer is None:
            raise invalid("messages", "this bundle has no tokenizer, so it has no chat template; use /v1/completions "
                                      "with 'prompt' as token ids")
        from hotcold.errors import HotcoldError

        try:
            ids = tokenizer.encode(tokenizer.render_chat(msgs))
        except HotcoldError as e:  # the model's own template refused these messages
            raise invalid("messages", e.what) from None
    else:
        ids = _prompt_ids(body, tokenizer, vocab)

    if any(not 0 <= t < vocab for t in ids):  # a bundle whose tokenizer knows more ids than its model
        raise APIError(500, f"the bundle's tokenizer produced token ids outside the model's vocabulary [0, {vocab}); "
                            "re-export the bundle with the model's own tokenizer", type="server_error",
                       code="tokenizer_mismatch")
    room = max_len - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server's context is {max_len} tokens, which "
                            "leaves no room to generate; shorten the prompt", code="context_length_exceeded",
                       param="messages" if kind == "chat" else "prompt")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(key)
    if mt is None:
        max_tokens = room if kind == "chat" else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
    elif not _is_int(mt):
        raise invalid(key, f"'{key}' must be an integer, got {json.dumps(mt)[:40]}", code="invalid_type")
    elif mt < 1:
        raise invalid(key, f"'{key}' is {mt}; it must be at least 1")
    elif mt > room:
        raise APIError(400, f"'{key}' is {mt}, but the prompt is {len(ids)} tokens and this server's context is "
                            f"{max_len}, so at most {room} can be generated; lower {key} or shorten the prompt",
                       code="context_length_exceeded", param=key)
    else:
        max_tokens = mt
    return GenRequest(kind=kind, model=model, prompt_ids=ids, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, stop=stop, stream=stream, include_usage=include_usage)


# ---- responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: GenRequest, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
    head = {"id": req.id, "created": req.created, "model": req.model}
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": usage(len(req.prompt_ids), completion_tokens)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage(len(req.prompt_ids), completion_tokens)}


def chunk(req: GenRequest, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One streamed event. Chat: the first carries the role, the last an empty delta and the finish reason."""
    head = {"id": req.id, "created": req.created, "model": req.model}
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(req: GenRequest, completion_tokens: int) -> dict[str, Any]:
    """The final event of `stream_options: {include_usage: true}`: no choices, the usage."""
    return {"id": req.id, "created": req.created, "model": req.model,
            "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
            "choices": [], "usage": usage(len(req.prompt_ids), completion_tokens)}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
