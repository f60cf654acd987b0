"""Training prompts for dream-train: a JSONL file, a LLaVA-style conversation JSON, or ``scenes:N``.

Every source yields ``Sample(images, prompt)``; answers are not read from the data: the target writes its
own (self-distillation), so the drafter learns the distribution it will have to predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import DreamExportError


@dataclass
class Sample:
    images: list            # file paths or PIL images
    prompt: str
    temperature: float = 0.0  # the target's answer: greedy (0) or sampled at this temperature (top-p 0.95) ...
    seed: int = 0             # ... with this seed: more of the target's own text from the same prompts
    answer: list | None = None  # the target's own greedy answer ids when already generated (batched: selfinstruct)


def load_samples(spec: str, seed: int = 0) -> list[Sample]:
    if spec.startswith("scenes:"):
        return _scenes(spec, seed)
    path = Path(spec)
    if not path.is_file():
        raise DreamExportError(f"--data {spec!r}: not a file and not scenes:N")
    if path.suffix == ".jsonl":
        return _jsonl(path)
    return _llava(path)


def _scenes(spec: str, seed: int) -> list[Sample]:
    import numpy as np

    from ..scenes import qa_pairs, random_scene

    try:
        n = int(spec.split(":", 1)[1])
    except ValueError as exc:
        raise DreamExportError(f"--data {spec!r}: expected scenes:N with N a number of scenes") from exc
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        qas = qa_pairs(scene, rng)
        qa = qas[int(rng.integers(len(qas)))]
        out.append(Sample([scene.render()], qa.prompt))
    return out


def _resolve(base: Path, image) -> Path:
    p = Path(image)
    return p if p.is_absolute() else base / p


def _jsonl(path: Path) -> list[Sample]:
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            images = row.get("image") or []  # none: a text-only prompt
            images = images if isinstance(images, list) else [images]
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise TypeError("the prompt is empty")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DreamExportError(f'{path}:{lineno}: expected {{"prompt": text, "image": path or [paths] (optional)}} '
                                   f'({exc})') from exc
        out.append(Sample([_resolve(path.parent, i) for i in images], prompt))
    return out


def _llava(path: Path) -> list[Sample]:
    """LLaVA conversation JSON: [{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}]."""
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DreamExportError(f"{path}: not valid JSON ({exc}); expected a .jsonl file or a LLaVA-style JSON list") from exc
    out = []
    for i, row in enumerate(rows):
        try:
            images = row.get("image", [])
            images = images if isinstance(images, list) else [images]
            human = next(c["value"] for c in row["conversations"] if c["from"] == "human")
        except (KeyError, StopIteration, AttributeError) as exc:
            raise DreamExportError(f"{path}: entry {i}: expected 'conversations' with a 'human' turn ({exc})") from exc
        prompt = human.replace("<image>", "").strip()
        out.append(Sample([_resolve(path.parent, im) for im in images], prompt))
    return out


def chat_text(processor, prompt: str, n_images: int = 0, generation_prompt: bool = True) -> str:
    """One user turn (``n_images`` images, then ``prompt``) through the target's chat template: how every
    training prompt is written (``features`` and ``selfinstruct``)."""
    messages = [{"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def open_images(sample: Sample) -> list[Image.Image]:
    from PIL import ImageOps

    imgs = []
    for im in sample.images:
        if isinstance(im, Image.Image):
            imgs.append(im)
        else:
            with Image.open(im) as f:
                f.load()
                imgs.append(ImageOps.exif_transpose(f))
    return imgs
