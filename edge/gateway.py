"""`edge-chat serve`: the OpenAI HTTP API and a chat page in front of the edge (Starlette on uvicorn).

    GET  /                       the chat page (edge/static/chat.html)
    GET  /v1/models              the one model
    POST /v1/chat/completions    OpenAI's chat completions, streamed (server-sent events, a chunk per sentence,
    POST /v1/completions         then [DONE]) or not; edge.openai_api maps the parameters

Each answer runs in a worker thread of its own (the ONNX Runtime decoder and the blocking gRPC stream), at most
`workers` at once; their cloud sessions are stepped concurrently and the cloud batches them. Sessions are kept
by conversation prefix (edge.conversations). At the door: an optional API key (Bearer), a request size limit,
a max_tokens limit; a client that goes away ends its answer after the sentence being decoded; a cloud that
refuses is a 503, one that cannot be reached a 502, with the reason. It binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from sllm.edge import openai_api as oa
from sllm.edge.conversations import Conversations, Reply
from sllm.edge.failures import EdgeError, TurnError
from sllm.sentences.sampling import AnswerOptions

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 4096
DEFAULT_WORKERS = 16
# the cloud cannot be reached (502) rather than refusing (503)
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None}
SWITCH_INTERVAL_S = 0.0005


def create_app(pool: Conversations, model_id: str, *, defaults: AnswerOptions = AnswerOptions(),
               api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_tokens: int = DEFAULT_MAX_TOKENS, workers: int = DEFAULT_WORKERS) -> Starlette:
    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="answer")
    created = int(time.time())

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())

    async def guarded(request: Request, handle) -> Response:
        if not authorized(request):
            return _error(oa.ApiError(401, "a valid API key is required (Authorization: Bearer KEY; the server's "
                                           "--api-key)", code="invalid_api_key"))
        try:
            return await handle(request)
        except oa.ApiError as e:
            return _error(e)

    async def page(request: Request) -> Response:
        return HTMLResponse(resources.files("sllm.edge").joinpath("static/chat.html").read_text(encoding="utf-8"))

    async def models(request: Request) -> Response:
        async def listing(r: Request) -> Response:
            return _json(oa.models_list(model_id, created))

        return await guarded(request, listing)

    async def chat_completions(request: Request) -> Response:
        return await guarded(request, lambda r: answer(r, oa.chat_request, chat=True))

    async def completions(request: Request) -> Response:
        return await guarded(request, lambda r: answer(r, oa.completion_request, chat=False))

    async def answer(request: Request, parse, chat: bool) -> Response:
        req = parse(await _body(request, max_request_bytes), defaults, max_tokens, model_id)
        run = _Run(pool, req, executor)
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            first = await run.next()  # nothing is sent before the answer starts: a failure is an HTTP status
        except BaseException:
            watcher.cancel()
            raise
        if isinstance(first, Exception):
            watcher.cancel()
            return _error(_api_error(first))
        if not req.stream:
            reply = first
            while isinstance(reply, str):  # the pieces: the Reply holds the whole text
                reply = await run.next()
            watcher.cancel()
            if isinstance(reply, Exception):
                return _error(_api_error(reply))
            shape = oa.chat_response if chat else oa.completion_response
            return _json(shape(oa.new_id("chatcmpl" if chat else "cmpl"), model_id, reply.text, reply.finish_reason,
                               reply.end_reason, oa.usage(reply.prompt_tokens, reply.completion_tokens)))
        return StreamingResponse(_events(run, first, watcher, req, model_id, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        pool.close()  # frees every held cloud session

    app = Starlette(routes=[Route("/", page), Route("/v1/models", models),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"])], lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.pool = pool
    return app


class _Run:
    """One answer in a worker thread: its pieces of text, then its Reply (or the exception), handed to the event
    loop one by one. `cancel()` ends it after the sentence being decoded."""

    def __init__(self, pool: Conversations, req: oa.AnswerRequest, executor: ThreadPoolExecutor):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        put = self.queue.put_nowait

        def work() -> None:
            try:
                result = pool.answer(req.messages, req.options, stop=req.stop, max_tokens=req.max_tokens,
                                     emit=lambda text: loop.call_soon_threadsafe(put, text), cancelled=self.cancelled)
            except Exception as e:  # noqa: BLE001 - handed to the request, which answers with its status
                result = e
            loop.call_soon_threadsafe(put, result)

        executor.submit(work)

    async def next(self):
        return await self.queue.get()

    def cancel(self) -> None:
        self.cancelled.set()


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """The client went away: the answer ends after the sentence being decoded (no more cloud steps)."""
    while True:
        event = await request.receive()  # an ASGI event, not a server message
        if event["type"] == "http.disconnect":
            run.cancel()
            return


async def _events(run: _Run, first, watcher: asyncio.Task, req: oa.AnswerRequest, model_id: str, chat: bool):
    """The answer as server-sent events: OpenAI's chunks, one per piece of text, the last with finish_reason,
    a usage chunk if asked, then [DONE]. An error after the first chunk is one `error` event."""
    rid, created = oa.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    try:
        if chat:
            yield _sse(oa.chat_chunk(rid, model_id, created, {"role": "assistant", "content": ""}))
        item = first
        while True:
            if isinstance(item, str):
                yield _sse(oa.chat_chunk(rid, model_id, created, {"content": item}) if chat
                           else oa.completion_chunk(rid, model_id, created, item))
            elif isinstance(item, Reply):
                yield _sse(oa.chat_chunk(rid, model_id, created, {}, item.finish_reason, item.end_reason) if chat
                           else oa.completion_chunk(rid, model_id, created, "", item.finish_reason, item.end_reason))
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": model_id, "choices": [],
                                "usage": oa.usage(item.prompt_tokens, item.completion_tokens)})
                break
            else:
                yield _sse(_api_error(item).body())
                break
            item = await run.next()
        yield b"data: [DONE]\n\n"
    finally:
        run.cancel()  # a client gone mid-stream: no more cloud steps
        watcher.cancel()


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _json(obj: dict, status: int = 200) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status_code=status, media_type="application/json")


def _error(e: oa.ApiError) -> Response:
    return _json(e.body(), e.status)


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown routes answer in OpenAI's error shape too (clients parse every error body)."""
    return _error(oa.ApiError(404, f"no route {request.method} {request.url.path}; this server has "
                                   "/v1/models, /v1/chat/completions and /v1/completions", code="not_found"))


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(oa.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed"))


def _api_error(e: Exception) -> oa.ApiError:
    """A failed answer as an HTTP error: the request's (400), the cloud's (502 unreachable, 503 refused)."""
    if isinstance(e, oa.ApiError):
        return e
    if isinstance(e, TurnError):
        return oa.ApiError(400, str(e))
    if isinstance(e, EdgeError):
        if e.code in _UNREACHABLE:
            return oa.ApiError(502, f"the cloud could not be reached: {e}", type="cloud_unreachable",
                               code=e.code.name.lower() if e.code else None)
        return oa.ApiError(503, f"the cloud refused: {e}", type="cloud_unavailable", code=e.code.name.lower())
    return oa.ApiError(500, f"unexpected {type(e).__name__}: {e}", type="server_error")


async def _body(request: Request, limit: int) -> object:
    """The request's JSON body; 413 past `limit` bytes (told by Content-Length or counted as it comes)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise oa.ApiError(413, f"the request body is {length} bytes; this server takes at most {limit}",
                          code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise oa.ApiError(413, f"the request body is over {limit} bytes, the most this server takes",
                              code="request_too_large")
    try:
        return json.loads(data)
    except ValueError as e:
        raise oa.ApiError(400, f"the request body is not JSON: {e}") from None


def serve(app: Starlette, host: str, port: int, *, ready=None, log_level: str = "warning") -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM (in the main thread) or stop(). ready(address, stop): called
    once it listens; stop() ends it (from any thread)."""
    import sys

    import uvicorn

    # the event loop shares the GIL with the answers' worker threads, whose decode loops hold it between ONNX
    # Runtime calls: a shorter switch interval than Python's 5 ms lets a finished sentence out sooner
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            sock = server.servers[0].sockets[0].getsockname()
            ready(f"{sock[0]}:{sock[1]}", lambda: setattr(server, "should_exit", True))
        await task

    asyncio.run(main())
