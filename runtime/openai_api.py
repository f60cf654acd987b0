"""The OpenAI chat-completions schema as ``dream-serve`` speaks it: requests parsed and checked (pure functions,
tested without a server; every bad field is an ``ApiError`` with an OpenAI-style body and a 4xx status) and the
pieces of a response (finish reasons, usage, the ``dream`` extension fields)."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .preprocess import load_image

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


# --- requests -------------------------------------------------------------------------------------------

def decode_image(url: str, where: str, allow_local_files: bool, max_pixels: int = MAX_IMAGE_PIXELS):
    """An ``image_url`` -> PIL image. ``data:image/...;base64,...`` always; ``file://`` or a plain path only when
    local files are allowed; remote URLs never (the server does not fetch)."""
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


# --- responses ------------------------------------------------------------------------------------------

FINISH = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length",
          "time": "length", "cancelled": "stop"}


def response_extras(res) -> dict:
    out = res.to_json()
    return {k: out[k] for k in ("stop_reason", "ttft_ms", "tokens_per_s", "speculative", "cached_tokens",
                                "mean_accept_length", "accept_lengths") if k in out}


def usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.num_new_tokens,
            "total_tokens": res.prompt_tokens + res.num_new_tokens,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}
