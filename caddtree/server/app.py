"""The HTTP layer: OpenAI's endpoints over one loaded pair (FastAPI on uvicorn).

Requests are parsed and checked here, generated one at a time by the GenerationWorker, and
answered whole or streamed as server-sent events in OpenAI's chunk format. Every failure a client
can see is OpenAI's JSON error object with the fitting status; no traceback leaves the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from caddtree.server.protocol import ChatRequest, CompletionRequest, Reply, error_body
from caddtree.server.worker import OUTCOMES, GenerationJob, GenerationWorker, QueueFull

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               500: "server_error", 503: "server_error"}
DISCONNECT_POLL_SECONDS = 0.5
CLIENT_GONE = 499  # nginx's status for a client that closed the connection: logged, never read


class ClientError(Exception):
    """A request answered with an OpenAI error: HTTP status and message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), code), status_code=status)


def create_app(pair, model_name: str, generate_options: dict, max_queue: int = 16, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The server's app: `generate_options` (method, budget, rule, cost_model, lookup) apply to every request."""
    state = {}

    @asynccontextmanager
    async def lifespan(_app):
        state["worker"] = GenerationWorker(pair, generate_options, max_queue)
        yield
        worker = state["worker"]
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        counts = ", ".join(f"{worker.counts[outcome]} {outcome}" for outcome in OUTCOMES)
        print(f"server stopped: {counts}", file=sys.stderr, flush=True)

    app = FastAPI(title="caddtree", lifespan=lifespan)

    @app.exception_handler(ClientError)
    async def client_error(_request, error: ClientError):
        return error_response(error.status, str(error), error.code)

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}")

    # A dependency, not an HTTP middleware: Starlette's middleware hands the endpoint a `receive`
    # that never reports the client's departure, so a whole reply would generate for nobody.
    def authenticate(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            reason = "no API key given" if not given else "wrong API key"
            raise ClientError(401, f"{reason}: send the header Authorization: Bearer KEY", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @app.get("/health")
    async def health():
        worker = state["worker"]
        return {"status": "ok", "model": model_name, "waiting": worker.waiting, "running": worker.running is not None,
                **{outcome: worker.counts[outcome] for outcome in OUTCOMES}}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "caddtree"}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await request.body())
        messages = [message.model_dump() for message in body.messages]
        return await complete(request, body, Reply(chat=True, model=model_name), messages, raw=False)

    @v1.post("/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        return await complete(request, body, Reply(chat=False, model=model_name), body.prompt, raw=True)

    async def complete(request: Request, body, reply: Reply, prompt, raw: bool):
        if body.model != model_name:
            raise ClientError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                              "model_not_found")
        options = {"max_new_tokens": body.new_tokens(default_max_tokens), "temperature": body.temperature,
                   "top_p": body.top_p, "seed": body.seed if body.seed is not None else secrets.randbelow(2**31)}
        job = GenerationJob(prompt, raw, options, body.stop, asyncio.get_running_loop())
        try:
            state["worker"].submit(job)
        except QueueFull:
            raise ClientError(503, f"the server is busy: {max_queue} requests already wait; try again later",
                              "queue_full") from None
        client = Client(request)
        kind, value = await next_event(client, job)
        if kind == "error":
            raise ClientError(*value)
        if kind == "gone":
            return Response(status_code=CLIENT_GONE)
        if body.stream:
            return StreamingResponse(stream(job, reply), media_type="text/event-stream")
        return await whole(client, job, reply)

    app.include_router(v1)
    return app


def parse(model, raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ClientError(400, f"invalid request: {where + ': ' if where else ''}{first['msg']}") from None


class Client:
    """Whether a request's client has left, asked of Starlette at most every DISCONNECT_POLL_SECONDS
    (by the clock: a generation sends text faster than any timeout would notice)."""

    def __init__(self, request: Request):
        self.request = request
        self.next_check = time.monotonic() + DISCONNECT_POLL_SECONDS

    async def gone(self) -> bool:
        if time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
        return await self.request.is_disconnected()


async def next_event(client: Client, job: GenerationJob):
    """The job's next event, or ("gone", None) for a client that has left: that cancels the job
    (it ends at the next round). Streams learn of a departure from Starlette instead: see `stream`."""
    while True:
        if await client.gone():
            job.cancelled.set()
            return "gone", None
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)


async def whole(client: Client, job: GenerationJob, reply: Reply) -> Response:
    pieces = []
    while True:
        kind, value = await next_event(client, job)
        if kind == "text":
            pieces.append(value)
        elif kind == "gone":
            return Response(status_code=CLIENT_GONE)
        elif kind == "error":
            return error_response(*value)
        else:
            result, finish_reason = value
            return JSONResponse(reply.whole("".join(pieces), finish_reason, result))


async def stream(job: GenerationJob, reply: Reply):
    """Server-sent events: OpenAI chunks, the statistics in the last one, then [DONE]."""
    finished = False
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        while not finished:
            kind, value = await job.events.get()
            if kind == "text":
                yield sse(reply.chunk(text=value))
            elif kind == "error":
                yield sse(error_body(value[1], ERROR_TYPES.get(value[0], "server_error")))
                finished = True
            else:
                result, finish_reason = value
                yield sse(reply.chunk(finish_reason=finish_reason, result=result))
                finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client left mid-stream
            job.cancelled.set()


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
