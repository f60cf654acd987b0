"""``dream-serve``: an OpenAI-compatible local HTTP server over one bundle (Starlette + uvicorn).

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts; ``stream: true`` as server-sent events),
``GET /v1/models``, ``GET /health``. One pipeline answers one request at a time (``Pipeline``'s lock); up to
``max_queue`` requests wait, more get 429. Images come as base64 ``data:`` URLs; local file paths only with
``--allow-local-files``; the server never fetches remote URLs. Every bad request gets an OpenAI-style JSON error
with a 4xx status. A client that disconnects stops its generation at the next token.

Extensions to the OpenAI schema: request fields ``speculative`` (bool) and ``deadline_s`` (seconds); responses
carry ``dream`` (stop reason, acceptance lengths, ttft, tokens/s, cached prompt tokens). The schema (request
parsing, response pieces) is ``openai_api``'s; this module is the server around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from .bundle import find_latest_bundle
from .errors import InputError, RuntimeErrorBase
from .openai_api import FINISH, MAX_BODY_BYTES, ApiError, parse_messages, parse_options, response_extras, usage
from .ort_threads import use_global_pool
from .pipeline import Pipeline
from .store import store_root

# --- the app ---------------------------------------------------------------------------------------------

class Server:
    """State shared by the routes: the pipeline, the queue bound, counters (``/health``)."""

    def __init__(self, pipe, model_name: str, max_queue: int = 8, allow_local_files: bool = False,
                 max_body_bytes: int = MAX_BODY_BYTES, reuse: bool = True):
        self.pipe = pipe
        self.model_name = model_name
        self.max_queue = max_queue
        self.allow_local_files = allow_local_files
        self.max_body_bytes = max_body_bytes
        self.reuse = reuse  # keep the last request's context: a resent, growing conversation pays for its new turn
        self.in_flight = 0  # queued + running
        self.counts = {"completed": 0, "cancelled": 0, "rejected_busy": 0, "errors": 0}
        self.last = {}
        self.created = int(time.time())

    def app(self):
        # Starlette and uvicorn are the optional serve extra: imported only when a server is made
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def health(request: Request):
            return JSONResponse({"status": "ok", "model": self.model_name, "in_flight": self.in_flight,
                                 "max_queue": self.max_queue, **self.counts, "last": self.last})

        async def models(request: Request):
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dream-export"}]})

        async def on_api_error(request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status)

        async def on_http_error(request, exc: HTTPException):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

        async def on_error(request, exc: Exception):  # never a crash: a JSON 500 naming the error
            self.counts["errors"] += 1
            return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                                status_code=500)

        return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                                 Route("/v1/chat/completions", self.chat_completions, methods=["POST"])],
                         exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error})

    async def _body(self, request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {self.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def chat_completions(self, request):
        from starlette.responses import JSONResponse, StreamingResponse  # the serve extra (see app)

        body = await self._body(request)
        model = body.get("model")
        if model not in (self.model_name, None):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        # parse (and decode images) off the event loop: a large image takes a while
        messages, options = await asyncio.to_thread(self._parse, body)
        if self.in_flight >= self.max_queue:
            self.counts["rejected_busy"] += 1
            raise ApiError(429, f"the server is busy: {self.in_flight} requests queued or running (limit "
                                f"{self.max_queue}); retry later", "rate_limit_error", code="queue_full")
        self.in_flight += 1
        cancel = threading.Event()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        worker = threading.Thread(target=self._work, args=(messages, options, cancel, events, loop), daemon=True)
        worker.start()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": self.model_name}

        if not body.get("stream"):
            try:
                final = None
                while final is None:
                    kind, value = await self._next(events, request, cancel)
                    if kind == "error":
                        raise value
                    if kind == "final":
                        final = value[1]
            finally:
                cancel.set()
            return JSONResponse({**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": final.text},
                "finish_reason": FINISH.get(final.stop_reason, "stop")}], "usage": usage(final),
                "dream": response_extras(final)})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        first = await self._next(events, request, cancel)  # errors before the first token are plain 4xx responses
        if first[0] == "error":
            cancel.set()
            raise first[1]

        async def sse():
            chunk = {**base, "object": "chat.completion.chunk"}
            try:
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
                item = first
                while True:
                    kind, value = item
                    if kind == "error":  # after the stream began: an error event, then the end
                        yield _sse(value.body() if isinstance(value, ApiError) else
                                   ApiError(500, str(value), "server_error").body())
                        break
                    if kind == "piece":
                        if value:
                            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": value}, "finish_reason": None}]})
                    else:
                        tail, res = value
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": tail} if tail else {},
                                                          "finish_reason": FINISH.get(res.stop_reason, "stop")}],
                                    "dream": response_extras(res)})
                        if include_usage:
                            yield _sse({**chunk, "choices": [], "usage": usage(res)})
                        break
                    item = await self._next(events, request, cancel)
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # a client that went away stops the generation at its next token

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _parse(self, body: dict):
        return parse_messages(body.get("messages"), self.allow_local_files), parse_options(body, self.pipe)

    async def _next(self, events: asyncio.Queue, request, cancel: threading.Event):
        """The worker's next event; a client that disconnected meanwhile sets ``cancel``."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel.set()

    def _work(self, messages, options, cancel, events: asyncio.Queue, loop) -> None:
        """In a worker thread: run the pipeline (behind its lock) and hand events to the event loop."""
        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        try:
            final = None
            for event in self.pipe.stream_chat(messages, cancel=cancel, reuse=self.reuse, **options):
                if event.final is None:
                    put(("piece", event.text))
                else:
                    final = event.final
                    tail = event.text
            self.counts["cancelled" if final.stop_reason == "cancelled" else "completed"] += 1
            self.last = {"stop_reason": final.stop_reason, "completion_tokens": final.num_new_tokens}
            put(("final", (tail, final)))
        except InputError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            put(("error", ApiError(400, str(exc), code=code)))
        except RuntimeErrorBase as exc:
            put(("error", ApiError(500, str(exc), "server_error")))
        except Exception as exc:  # never let a worker die silently
            self.counts["errors"] += 1
            put(("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")))
        finally:
            loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        self.in_flight -= 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dream-serve", description="An OpenAI-compatible local server over a bundle.")
    p.add_argument("--bundle", type=Path, help="bundle folder (default: the most recent bundle in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle folder's name)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="accept image_url values that are local file paths (file:// or plain); off by default")
    p.add_argument("--max-queue", type=int, default=8, help="requests queued or running before 429 (default 8)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20))
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="compute every request from scratch (default: reuse the previous request's K/V where its "
                        "images and leading tokens match)")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-trt, trt (as dream-run)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("dream-serve: error: the server needs its extra: pip install 'dream-export[serve]'", file=sys.stderr)
        return 2
    try:
        bundle = args.bundle or find_latest_bundle(store_root())
        if bundle is None:
            raise RuntimeErrorBase(f"no bundle in {store_root() / 'bundles'}; export one or pass --bundle")
        if args.max_queue < 1:
            raise RuntimeErrorBase(f"--max-queue {args.max_queue}: expected at least 1")
        pipe = Pipeline.from_bundle(bundle, backend=args.backend, threads=args.threads)
    except RuntimeErrorBase as exc:
        print(f"dream-serve: error: {exc}", file=sys.stderr)
        return 2
    server = Server(pipe, args.model_name or Path(bundle).resolve().name, args.max_queue, args.allow_local_files,
                    int(args.max_body_mb * (1 << 20)), reuse=not args.no_prefix_reuse)
    print(f"dream-serve: {server.model_name} on http://{args.host}:{args.port}/v1 (backend {pipe.backend.name}: "
          f"{pipe.backend.why}; loaded in {pipe.load_ms:.0f} ms)",
          file=sys.stderr)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0


def console() -> int:
    """The console command: this process owns all its ONNX Runtime sessions, so they share one thread pool."""
    use_global_pool()
    return main()


if __name__ == "__main__":
    sys.exit(console())
