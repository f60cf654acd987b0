"""Synthetic scenes: (image, prompt, answer) triples, deterministic by seed.

Spec: white background; 1-4 non-overlapping filled shapes from {circle, square, triangle},
each one pure colour from {red, green, blue, yellow}, each 15-35% of the shorter image side; image
sides 64-1024 px, any aspect ratio. Prompts and plain-English answers with a little varied wording.
Used for the built-in model's training data, drafter training, calibration and evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
NUM_CLASSES = 1 + len(COLORS) * len(SHAPES)  # what a pixel can hold: 0 = background, then one class per colour x shape

# Scene seeds (``np.random.default_rng(seed)`` draws the scenes), one range per use, so that nothing held out, evaluated
# or calibrated on is ever trained on:
#   [0, HELDOUT_SEED)   training: each recipe's own TRAIN_SEED, the drafter recipes' ``scenes:N`` data (seed 0)
HELDOUT_SEED = 9_000_000         # the recipes' held-out scenes: a training stage ends on their accuracy
EVAL_SEED = 10_000_000           # dream-eval and the tests' accuracy checks
CHECK_SEED = 30_000_000          # dream-check and dream-bench
CALIB_SEED = 40_000_000          # INT8 calibration prompts


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float      # centre, pixels
    cy: float
    size: float    # side / diameter, pixels

    def position(self, width: int, height: int) -> str:
        """Rough position by thirds: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
        col = ("left", "", "right")[min(int(3 * self.cx / width), 2)]
        row = ("top", "", "bottom")[min(int(3 * self.cy / height), 2)]
        return (f"{row} {col}".strip()) or "center"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            r = s.size / 2
            fill = COLORS[s.color]
            if s.kind == "circle":
                draw.ellipse([s.cx - r, s.cy - r, s.cx + r, s.cy + r], fill=fill)
            elif s.kind == "square":
                draw.rectangle([s.cx - r, s.cy - r, s.cx + r, s.cy + r], fill=fill)
            else:  # upright equilateral-ish triangle inscribed in the size x size box
                draw.polygon([(s.cx, s.cy - r), (s.cx - r, s.cy + r), (s.cx + r, s.cy + r)], fill=fill)
        return img


def random_scene(rng: np.random.Generator, min_side: int = 64, max_side: int = 1024, max_shapes: int = 4) -> Scene:
    while True:
        # sides: log-uniform so small and large images are equally common; any aspect ratio
        w = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side + 1)))))
        h = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side + 1)))))
        w, h = min(max(w, min_side), max_side), min(max(h, min_side), max_side)
        n = int(rng.integers(1, max_shapes + 1))
        shapes: list[Shape] = []
        short = min(w, h)
        for _ in range(200):
            if len(shapes) == n:
                break
            size = rng.uniform(0.15, 0.35) * short
            cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
            # bounding circles (radius = half diagonal) never touch: shapes cannot overlap
            if all(math.hypot(cx - o.cx, cy - o.cy) > (size + o.size) / 2 * math.sqrt(2) + 2 for o in shapes):
                shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), cx, cy, size))
        if len(shapes) == n:
            return Scene(w, h, tuple(shapes))


def _count(n: int) -> str:
    return NUMBER_WORDS[n]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class QA:
    qtype: str
    prompt: str
    answer: str                  # the wording used for training
    accepted: tuple[str, ...]    # every wording counted as an exact answer


def qa_pairs(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """One question of each type for the scene; the answer's wording varies with rng."""
    W, H, S = scene.width, scene.height, scene.shapes
    out: list[QA] = []

    def add(qtype, prompt, options):
        out.append(QA(qtype, prompt, options[int(rng.integers(len(options)))], tuple(options)))

    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    n = len(S)
    noun = "shape" if n == 1 else "shapes"
    # caption: every shape with its colour and rough position
    parts = [f"{_article(s.color)} {s.color} {s.kind} at the {s.position(W, H)}" for s in S]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    add("caption", "Describe the image.",
        [f"The image shows {listing}.", f"There {'is' if n == 1 else 'are'} {_count(n)} {noun}: {listing}."])
    add("count", "How many shapes are there?",
        [f"There {'is' if n == 1 else 'are'} {_count(n)} {noun}.", f"I count {_count(n)} {noun}."])
    color = pick(list(COLORS))
    k = sum(s.color == color for s in S)
    add("color_count", f"How many {color} shapes are there?",
        [f"There are no {color} shapes."] if k == 0 else
        [f"There {'is' if k == 1 else 'are'} {_count(k)} {color} {'shape' if k == 1 else 'shapes'}."])
    kind = pick([s.kind for s in S] + list(SHAPES))
    of_kind = [s for s in S if s.kind == kind]
    if len(of_kind) == 1:
        options = [f"The {kind} is {of_kind[0].color}.", f"It is {of_kind[0].color}."]
    elif not of_kind:
        options = [f"There is no {kind} in the image."]
    else:
        options = [f"There are {_count(len(of_kind))} {kind}s, so there is no single answer."]
    add("color", f"What color is the {kind}?", options)
    color = pick([s.color for s in S] + list(COLORS))
    of_color = [s for s in S if s.color == color]
    if len(of_color) == 1:
        k0 = of_color[0].kind
        options = [f"The {color} shape is {_article(k0)} {k0}.", f"It is {_article(k0)} {k0}."]
    elif not of_color:
        options = [f"There is no {color} shape in the image."]
    else:
        options = [f"There are {_count(len(of_color))} {color} shapes, so there is no single answer."]
    add("shape", f"What shape is {color}?", options)
    color, kind = pick(list(COLORS)), pick(list(SHAPES))
    if rng.random() < 0.5:
        s0 = S[int(rng.integers(n))]
        color, kind = s0.color, s0.kind
    yes = any(s.color == color and s.kind == kind for s in S)
    add("yesno", f"Is there {_article(color)} {color} {kind}?",
        [f"Yes, there is {_article(color)} {color} {kind}.", "Yes."] if yes else [f"No, there is no {color} {kind}.", "No."])
    s0 = S[int(rng.integers(n))]
    same = [s for s in S if s.color == s0.color and s.kind == s0.kind]
    if len(same) == 1:
        pos = s0.position(W, H)
        options = [f"The {s0.color} {s0.kind} is at the {pos}.", f"It is at the {pos}."]
    else:
        options = [f"There are {_count(len(same))} {s0.color} {s0.kind}s, at the "
                   + " and the ".join(s.position(W, H) for s in same) + "."]
    add("where", f"Where is the {s0.color} {s0.kind}?", options)
    return out


QUESTION_TYPES = ("caption", "count", "color_count", "color", "shape", "yesno", "where")


def class_index(color: str, kind: str) -> int:
    """The class of a ``color`` ``kind`` shape (1..NUM_CLASSES-1; 0 is the background)."""
    return 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(kind)


def label_map(scene: Scene) -> np.ndarray:
    """[H,W] uint8 class map drawn with the renderer's geometry (no anti-aliasing)."""
    img = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        r, v = s.size / 2, class_index(s.color, s.kind)
        box = [s.cx - r, s.cy - r, s.cx + r, s.cy + r]
        if s.kind == "circle":
            draw.ellipse(box, fill=v)
        elif s.kind == "square":
            draw.rectangle(box, fill=v)
        else:
            draw.polygon([(s.cx, s.cy - r), (s.cx - r, s.cy + r), (s.cx + r, s.cy + r)], fill=v)
    return np.array(img)


def cell_labels(frame: np.ndarray, grid: int, min_frac: float = 0.1) -> np.ndarray:
    """[grid*grid] labels: the majority non-empty class of each cell when it covers >= min_frac of it."""
    h = frame.shape[0] // grid
    out = np.zeros(grid * grid, dtype=np.int64)
    for r in range(grid):
        for c in range(grid):
            cell = frame[r * h:(r + 1) * h, c * h:(c + 1) * h].ravel()
            counts = np.bincount(cell, minlength=NUM_CLASSES)
            counts[0] = 0
            if counts.max() >= min_frac * cell.size:
                out[r * grid + c] = int(counts.argmax())
    return out


def class_counts(scene: Scene) -> np.ndarray:
    """[NUM_CLASSES-1] how many shapes of each class the scene holds."""
    counts = np.zeros(NUM_CLASSES - 1, dtype=np.int64)
    for s in scene.shapes:
        counts[class_index(s.color, s.kind) - 1] += 1
    return counts


def scene_examples(seed: int, count: int):
    """Yield (scene, QA) for ``count`` scenes drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = random_scene(rng)
        for qa in qa_pairs(scene, rng):
            yield scene, qa


def caption_names_every_shape(scene: Scene, text: str) -> bool:
    """True when the caption names each shape with its colour (as many times as it occurs)."""
    low = text.lower()
    for s in set((s.color, s.kind) for s in scene.shapes):
        need = sum((o.color, o.kind) == s for o in scene.shapes)
        if low.count(f"{s[0]} {s[1]}") < need:
            return False
    return True


def grade(qa: QA, scene: Scene, text: str) -> bool:
    """Exact-answer grading: the answer is one of the accepted wordings; a caption must name every shape
    with its colour."""
    text = text.strip()
    if qa.qtype == "caption":
        return caption_names_every_shape(scene, text)
    return text in qa.accepted
