"""examples/camera_loop.py on a short generated clip: every frame is answered or dropped, the answers equal
fresh calls on the same frames, and frames that arrive while busy are dropped."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dream_export.scenes import random_scene
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What color is the circle?", "How many shapes are there?"]


def load_example():
    spec = importlib.util.spec_from_file_location("camera_loop", ROOT / "examples" / "camera_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_clip(path: Path, n: int, duration_ms: int) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    frames = [random_scene(rng, min_side=96, max_side=200).render().convert("RGB").resize((160, 120)) for _ in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    with Image.open(path) as im:  # what a reader gets back (GIF palettes quantize colours)
        out = []
        for i in range(n):
            im.seek(i)
            out.append(np.array(im.convert("RGB")))
    return out


def test_camera_loop_answers_each_kept_frame_and_drops_the_rest(tiny, tmp_path):
    _, bundle = tiny
    clip = tmp_path / "clip.gif"
    frames = write_clip(clip, 12, 40)
    cam = load_example()
    pipe = Pipeline.from_bundle(bundle)
    out = io.StringIO()
    summary = cam.run(pipe, cam.pillow_frames(clip), QUESTIONS, speed=4.0, max_new_tokens=16, out=out, as_json=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    per_frame = [r for r in rows if "frame" in r]
    assert rows[-1] == {"summary": summary}
    assert summary["processed"] == len(per_frame) >= 1
    assert summary["processed"] + summary["dropped"] == len(frames)
    assert summary["dropped"] > 0  # 10 ms between frames at 4x: the loop cannot keep up, so it drops
    indices = [r["frame"] for r in per_frame]
    assert indices == sorted(indices) and indices[0] == 0
    for row in per_frame[:3]:
        for qa in row["answers"]:
            fresh = pipe.generate(frames[row["frame"]], qa["question"], max_new_tokens=16)
            assert qa["text"] == fresh.text
            assert qa["cached_tokens"] > 0  # the frame's prefix was reused


def test_camera_loop_cli_on_a_frame_folder(tiny, tmp_path):
    _, bundle = tiny
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        random_scene(rng, min_side=96, max_side=160).render().convert("RGB").save(folder / f"{i:03d}.png")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "camera_loop.py"), "--bundle", str(bundle), "--frames",
                        str(folder), "--fps", "1000", "--question", "What color is the circle?", "--json",
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    summary = rows[-1]["summary"]
    assert summary["processed"] + summary["dropped"] == 3 and summary["processed"] >= 1
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "camera_loop.py"), "--bundle", str(bundle),
                          "--video", str(tmp_path / "missing.gif")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no such video file" in bad.stderr
