"""The OpenAI HTTP API's shapes, for `edge-chat serve` (edge.gateway): a request body read into what an answer
needs (messages, AnswerOptions, stop strings, a token budget), the error body, the responses and stream chunks.
No I/O and no web framework here.

How a request's parameters become an answer's options (`answer_request`, the one mapping):

    temperature, top_p, seed       the same fields of AnswerOptions (unset: the server's defaults, edge-chat's:
                                   greedy); sentence i of an answer samples with seed + i
    max_tokens                     tokens of the whole answer: it ends inside the sentence that reaches it
    (max_completion_tokens)        (finish_reason "length")
    stop                           up to 4 strings; the answer ends before the first one (finish_reason "stop")
    presence_penalty p (-2..2)     repetition_penalty = 1.2 * 2 ** (p / 2) (CTRL: any token already in the
                                   answer; unset or 0: edge-chat's 1.2)
    frequency_penalty f (-2..2)    f < 0: repetition allowed (no n-gram ban, sentences may repeat); unset or 0:
                                   edge-chat's (no repeated 3-gram, no repeated sentence); f >= 1: no repeated
                                   2-gram either
    extensions (our own)           max_sentences, top_k, repetition_penalty, no_repeat_ngram_size,
                                   no_repeat_sentence, stop_threshold, max_sentence_tokens: AnswerOptions' fields

Refused with a 400 in OpenAI's error shape, never ignored: n > 1, tools / functions, logprobs, logit_bias,
a non-text response_format, best_of, echo, suffix, and any field not named here.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, replace

from sllm.sentences.sampling import AnswerOptions

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_STRINGS = 4
# accepted and without effect on the answer: OpenAI's bookkeeping fields
_HARMLESS = {"model", "user", "metadata", "store", "service_tier", "stream", "stream_options"}
_ANSWER = {"temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
           "frequency_penalty", "n"}
# AnswerOptions fields a request may set by name (the chat page does), beyond OpenAI's
_EXTENSIONS = {"max_sentences", "top_k", "repetition_penalty", "no_repeat_ngram_size", "no_repeat_sentence",
               "stop_threshold"}
_MAX_SENTENCE_TOKENS = "max_sentence_tokens"  # AnswerOptions.max_tokens (per sentence), named as edge-chat's flag
# refused unless absent or at their no-op value
_UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
                "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,),
                "modalities": (None, ["text"]), "prediction": (None,), "parallel_tool_calls": (None, True, False),
                "response_format": (None, {"type": "text"}), "reasoning_effort": (None,), "web_search_options": (None,)}


class ApiError(Exception):
    """A request refused: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class AnswerRequest:
    """What one request asks for, checked."""

    messages: list[Message]
    options: AnswerOptions
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # tokens of the whole answer
    stream: bool = False
    include_usage: bool = False


def chat_request(body: object, defaults: AnswerOptions, max_tokens_limit: int, model_id: str) -> AnswerRequest:
    """POST /v1/chat/completions: `messages` (role + text content) and the answer's parameters."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    return answer_request(body, [_message(m, i) for i, m in enumerate(messages)], {"messages"}, defaults,
                          max_tokens_limit, model_id)


def completion_request(body: object, defaults: AnswerOptions, max_tokens_limit: int, model_id: str) -> AnswerRequest:
    """POST /v1/completions: one `prompt` string (a list of one string too), read as one user message."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be one string (token-id prompts and batches of prompts are not supported)",
                       param="prompt")
    return answer_request(body, [Message("user", prompt)], {"prompt"}, defaults, max_tokens_limit, model_id)


def answer_request(body: dict, messages: list[Message], own: set[str], defaults: AnswerOptions,
                   max_tokens_limit: int, model_id: str) -> AnswerRequest:
    """The one mapping of a request's parameters onto AnswerOptions (the module's docstring says how)."""
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name} is not supported by this server (a sentence-level model: plain text, one "
                                "answer, no tools or log-probabilities)", param=name, code="unsupported_parameter")
    unknown = sorted(set(body) - own - _HARMLESS - _ANSWER - _EXTENSIONS - {_MAX_SENTENCE_TOKENS} - set(_UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}", param=unknown[0], code="unknown_parameter")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist here; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, "n must be 1: this server gives one answer per request", param="n",
                       code="unsupported_parameter")
    changes: dict = {}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            changes[name] = _number(body, name)
    if body.get("seed") is not None:
        changes["seed"] = _integer(body, "seed", 0)
    if body.get("presence_penalty") is not None:
        p = _number(body, "presence_penalty", -2, 2)
        if p:
            changes["repetition_penalty"] = defaults.repetition_penalty * 2 ** (p / 2)
    if body.get("frequency_penalty") is not None:
        f = _number(body, "frequency_penalty", -2, 2)
        if f < 0:
            changes.update(no_repeat_ngram_size=0, no_repeat_sentence=False)
        elif f >= 1:
            changes.update(no_repeat_ngram_size=2, no_repeat_sentence=True)
    for name in sorted(_EXTENSIONS):
        if body.get(name) is not None:
            changes[name] = body[name]
    if body.get(_MAX_SENTENCE_TOKENS) is not None:
        changes["max_tokens"] = body[_MAX_SENTENCE_TOKENS]
    try:
        options = replace(defaults, **changes)
    except (TypeError, ValueError) as e:
        raise ApiError(400, str(e)) from None
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            max_tokens = _integer(body, name, 1)
            if max_tokens > max_tokens_limit:
                raise ApiError(400, f"{name} is {max_tokens}; this server allows at most {max_tokens_limit}",
                               param=name)
    stream = body.get("stream") or False
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise ApiError(400, "stream must be true or false, stream_options an object", param="stream")
    return AnswerRequest(messages, options, _stops(body.get("stop")), max_tokens, stream,
                         bool(stream_options.get("include_usage")))


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _message(m: object, i: int) -> Message:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"messages[{i}] must be an object with a role among {', '.join(ROLES)} (tool messages "
                            "are not supported)", param=f"messages[{i}]")
    if m.get("tool_calls") or m.get("function_call") or m.get("audio"):
        raise ApiError(400, f"messages[{i}]: tool calls and audio are not supported", param=f"messages[{i}]")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    return Message(m["role"], content)


def _number(body: dict, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) else ""
        raise ApiError(400, f"{name} must be a number{bounds}, got {v!r}", param=name)
    return float(v)


def _integer(body: dict, name: str, low: int) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ApiError(400, f"{name} must be an integer >= {low}, got {v!r}", param=name)
    return v


def _stops(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}", param="stop")
    return stops


# ------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, end_reason: str, used: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish, "end_reason": end_reason}], "usage": used}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               end_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if end_reason is not None:
        choice["end_reason"] = end_reason
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_response(rid: str, model: str, text: str, finish: str, end_reason: str, used: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                         "end_reason": end_reason}], "usage": used}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None,
                     end_reason: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if end_reason is not None:
        choice["end_reason"] = end_reason
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "sllm"}]}
