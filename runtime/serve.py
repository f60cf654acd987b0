"""``dream-serve``: an OpenAI-compatible local HTTP server over one bundle (Starlette + uvicorn).

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts; ``stream: true`` as server-sent events),
``GET /v1/models``, ``GET /health``. One pipeline answers one request at a time (``Pipeline``'s lock); up to
``max_queue`` requests wait, more get 429. Images come as base64 ``data:`` URLs; local file paths only with
``--allow-local-files``; the server never fetches remote URLs. Every bad request gets an OpenAI-style JSON error
with a 4xx status. A client that disconnects stops its generation at the next token.

Extensions to the OpenAI schema: request fields ``speculative`` (bool) and ``deadline_s`` (seconds); responses
carry ``dream`` (stop reason, acceptance lengths, ttft, tokens/s, cached prompt tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import InputError, RuntimeErrorBase

MAX_BODY_BYTES = 20 << 20        # a request body (JSON with base64 images)
MAX_IMAGE_PIXELS = 40_000_000    # one decoded image
MAX_IMAGES = 8                   # per request
MAX_STOP = 4                     # stop strings per request (OpenAI's limit)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request parsing (pure functions, tested without a server) ---------------------------------------------

def decode_image(url: str, where: str, allow_local_files: bool, max_pixels: int = MAX_IMAGE_PIXELS):
    """An ``image_url`` -> PIL image. ``data:image/...;base64,...`` always; ``file://`` or a plain path only when
    local files are allowed; remote URLs never (the server does not fetch)."""
    from PIL import Image, UnidentifiedImageError

    from .preprocess import load_image

    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: expected a non-empty URL string", param=where)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header or not header[5:].startswith("image/"):
            raise ApiError(400, f"{where}: a data URL must look like data:image/<type>;base64,<data>", param=where)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"{where}: broken base64 in the data URL ({exc})", param=where) from exc
        try:
            im = Image.open(io.BytesIO(raw))
            if im.width * im.height > max_pixels:
                raise ApiError(413, f"{where}: image is {im.width}x{im.height} = {im.width * im.height} pixels; "
                                    f"the limit is {max_pixels}", param=where, code="image_too_large")
            im.load()
        except ApiError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ApiError(400, f"{where}: the data URL holds no image Pillow can read ({exc})", param=where) from exc
        return im
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                            f"base64 data: URL", param=where, code="remote_url_not_supported")
    if not allow_local_files:
        raise ApiError(400, f"{where}: local file paths are refused; start dream-serve with --allow-local-files "
                            f"or send a base64 data: URL", param=where, code="local_files_not_allowed")
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        im = load_image(Path(path))
    except InputError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where) from exc
    if im.width * im.height > max_pixels:
        raise ApiError(413, f"{where}: image is {im.width * im.height} pixels; the limit is {max_pixels}", param=where,
                       code="image_too_large")
    return im


def parse_messages(messages, allow_local_files: bool, max_images: int = MAX_IMAGES) -> list[dict]:
    """OpenAI chat messages -> ``Pipeline.chat`` messages (image parts decoded)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty array", param="messages")
    out, n_images = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", param=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role: {role!r}; expected system, developer, user or assistant", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content: expected a string or a non-empty array of parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                n_images += 1
                if n_images > max_images:
                    raise ApiError(400, f"{pw}: more than {max_images} images in one request", param=pw)
                if role != "user":
                    raise ApiError(400, f"{pw}: images are accepted in user messages only", param=pw)
                parts.append({"type": "image", "image": decode_image(url, f"{pw}.image_url", allow_local_files)})
            else:
                raise ApiError(400, f"{pw}: expected {{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                               param=pw)
        out.append({"role": role, "content": parts})
    if out[-1]["role"] == "assistant":
        raise ApiError(400, "messages: the last message is the assistant's; expected a user (or system) message to answer",
                       param="messages")
    return out


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (lo is not None and value < lo) or (hi is not None and value > hi):
        kind = "an integer" if integer else "a number"
        bounds = f" from {lo}" if lo is not None else ""
        bounds += f" to {hi}" if hi is not None else ""
        raise ApiError(400, f"{name}: {value!r}; expected {kind}{bounds}", param=name)
    return value


def parse_options(body: dict, pipe) -> dict:
    """Sampling and control fields -> keyword arguments of ``Pipeline.stream_chat``."""
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, pipe.max_positions, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOP
                              or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop: expected a non-empty string or an array of up to {MAX_STOP}", param="stop")
    speculative = body.get("speculative")
    if speculative is not None and not isinstance(speculative, bool):
        raise ApiError(400, "speculative: expected true, false or null", param="speculative")
    if speculative and not pipe.has_drafter:
        raise ApiError(400, "speculative: this bundle has no drafter", param="speculative")
    return dict(max_new_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9, seed=_number(body, "seed", None, integer=True),
                stop=stops, speculative=speculative, deadline_s=_number(body, "deadline_s", None, 1e-3))


FINISH = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length",
          "time": "length", "cancelled": "stop"}


def _extras(res) -> dict:
    out = res.to_json()
    return {k: out[k] for k in ("stop_reason", "ttft_ms", "tokens_per_s", "speculative", "cached_tokens",
                                "mean_accept_length", "accept_lengths") if k in out}


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.num_new_tokens,
            "total_tokens": res.prompt_tokens + res.num_new_tokens,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


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
        from starlette.responses import JSONResponse, StreamingResponse

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
                "finish_reason": FINISH.get(final.stop_reason, "stop")}], "usage": _usage(final), "dream": _extras(final)})

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
                                    "dream": _extras(res)})
                        if include_usage:
                            yield _sse({**chunk, "choices": [], "usage": _usage(res)})
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
    from .bundle import find_latest_bundle
    from .pipeline import Pipeline
    from .store import store_root

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
    from .ort_threads import use_global_pool

    use_global_pool()
    return main()


if __name__ == "__main__":
    sys.exit(console())
