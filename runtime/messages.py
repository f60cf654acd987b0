"""Conversations as callers give them (role + content, content a string or text / image / video parts) -> the
messages the chat template takes and the images in prompt order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .video import Video, is_video_path


def image_list(images) -> list:
    """None, one image (a path, a numpy frame or a PIL image) or several, as a list."""
    if images is None:
        return []
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getbands"):
        return [images]  # one image
    return list(images)


def user_message(images, prompt: str) -> list[dict]:
    """One user turn as a message list: the images (and video files, by their suffix) first, then the text
    (SmolVLM's layout)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; expected a question or instruction about the image(s)")
    parts = [{"type": "video", "video": im} if is_video_path(im) else {"type": "image", "image": im}
             for im in image_list(images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def normalize_messages(messages) -> tuple[list[dict], list]:
    """(messages as the chat template takes them, the images in order). Content may be a string or a list of
    text / image parts; image parts carry the image under ``"image"``."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'} dicts")
    shown, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: expected a dict with role 'system', 'user' or 'assistant' and a content")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise InputError(f"messages[{i}].content: expected a string or a non-empty list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and part.get("image") is not None:
                parts.append({"type": "image"})
                images.append(part["image"])
            elif kind == "video" and isinstance(part.get("video"), (str, Path)):
                parts.append({"type": "video"})
                images.append(Video(Path(part["video"])))
            else:
                raise InputError(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}, "
                                 f"{{'type': 'image', 'image': path | PIL image | numpy array}} or "
                                 f"{{'type': 'video', 'video': path}}")
        shown.append({"role": m["role"], "content": parts})
    return shown, images
