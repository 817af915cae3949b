"""The edge client: the SentenceVAE in ONNX Runtime, the gRPC client, `edge-chat`, a Python API.

    from sllm import edge
    with edge.connect("127.0.0.1:50051", "models/default/edge") as chat:
        print(chat.ask("Hello.").text())

No torch and no transformers anywhere in this package (a test imports every module with both
made unimportable). `import edge` itself loads nothing heavy: the API names below are imported
on first use. Modules:
    runtime    EdgeRuntime: verified bundle, segmenter, tokenizer, encoder, cached decoder loop (the numpy
               sampling and the decode loops are sllm.runtime's: the cloud's guesses decode with them too)
    loop       the sentence loop over a cloud "stepper" (chat, API and bench all run it)
    remote     RemoteStepper, the edge's one stepper: the cloud session, history vectors, reconnect,
               rebuild, failover, speculation
    speculate  the edge's check of the cloud's guessed sentences; the wire's Decoding of an answer
    failures   what a failed cloud call means (status code + ErrorReason); EdgeError, TurnError
    chat       ChatSession: runtime + remote stepper + sentence loop, one conversation
    api        connect / EdgeChat / Answer: the conversation for apps (docs/edge-api.md)
    local      LocalServer: `sllm-cloud serve` on loopback for `edge-chat --local`
    cli        the `edge-chat` command, built on the api (and `edge-chat serve`)
    openai_api the OpenAI HTTP API's requests (mapped onto AnswerOptions), errors, responses and chunks
    conversations  cloud sessions kept by conversation prefix, for a stateless chat API
    gateway    `edge-chat serve`: the OpenAI API and the chat page (static/chat.html), Starlette on uvicorn
"""
from __future__ import annotations

_API = ("connect", "load_runtime", "EdgeChat", "Answer", "AnswerOptions")
_CHAT = ("EdgeError", "TurnError")
_LOOP = ("SentenceEvent", "TurnEnd")
__all__ = [*_API, *_CHAT, *_LOOP]


def __getattr__(name: str):
    # lazy: these pull in onnxruntime, grpc and the tokenizer, which `import edge` should not
    if name in _API:
        from sllm.edge import api as module
    elif name in _CHAT:
        from sllm.edge import failures as module
    elif name in _LOOP:
        from sllm.edge import loop as module
    else:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    return getattr(module, name)
