"""A camera loop: frames arrive in real time, each processed frame gets a fixed set of questions through one
session (vision and the image prefix run once per frame), and frames that arrive while the model is busy are
dropped (only the newest waiting frame is kept), as a robot's perception loop does.

    python examples/camera_loop.py --bundle BUNDLE --video clip.gif          # a video file (GIF/APNG/TIFF via Pillow;
                                                                              #   any format OpenCV reads when installed)
    python examples/camera_loop.py --bundle BUNDLE --frames folder/           # a folder of images, in name order
    python examples/camera_loop.py --bundle BUNDLE --camera 0                 # a camera (needs OpenCV and a device)

Per frame it prints the frame index, its latency (session + all answers), each answer and the frames dropped so
far; ``--json`` prints one JSON object per line instead and a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

DEFAULT_QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Describe the image."]


# --- frame sources: iterators of RGB uint8 arrays, with the rate frames arrive at ----------------------------

def pillow_frames(path: Path):
    """Frames of a multi-frame image file (animated GIF / APNG / WebP, multi-page TIFF) with their durations."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            yield np.array(frame.convert("RGB")), (frame.info.get("duration") or 100) / 1000.0


def folder_frames(folder: Path, fps: float):
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise SystemExit(f"camera_loop: {folder} holds no .png/.jpg/.bmp/.webp frames")
    for p in files:
        with Image.open(p) as im:
            yield np.array(im.convert("RGB")), 1.0 / fps


def opencv_frames(source, fps: float | None):
    import cv2

    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise SystemExit(f"camera_loop: OpenCV cannot open {source!r}")
    period = 1.0 / (fps or cap.get(cv2.CAP_PROP_FPS) or 30.0)
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield bgr[:, :, ::-1].copy(), period  # OpenCV delivers BGR
    finally:
        cap.release()


def open_source(args):
    if args.camera is not None:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise SystemExit("camera_loop: --camera needs OpenCV: pip install opencv-python-headless")
        return opencv_frames(args.camera, args.fps), True
    if args.frames:
        return folder_frames(Path(args.frames), args.fps or 10.0), False
    path = Path(args.video)
    if not path.is_file():
        raise SystemExit(f"camera_loop: {path}: no such video file")
    try:
        import cv2  # noqa: F401

        if path.suffix.lower() not in (".gif", ".png", ".tif", ".tiff", ".webp"):
            return opencv_frames(str(path), args.fps), False
    except ImportError:
        pass
    return pillow_frames(path), False


class Mailbox:
    """The newest frame that arrived and was not taken yet; a frame that replaces an untaken one is dropped."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self.dropped = 0
        self.closed = False

    def put(self, item) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()

    def take(self):
        with self._cond:
            while self._item is None and not self.closed:
                self._cond.wait()
            item, self._item = self._item, None
            return item


def feed(source, mailbox: Mailbox, live: bool, speed: float) -> None:
    """Deliver frames at their own rate (a file is replayed in real time, ``speed`` x faster; a camera is live)."""
    t0 = time.perf_counter()
    due = 0.0
    for index, (frame, period) in enumerate(source):
        if not live:
            wait = t0 + due / speed - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            due += period
        mailbox.put((index, frame, time.perf_counter()))
    mailbox.close()


def run(pipe, source, questions, live=False, speed=1.0, max_new_tokens=32, max_frames=None, speculative=None,
        deadline_s=None, out=sys.stdout, as_json=False) -> dict:
    mailbox = Mailbox()
    feeder = threading.Thread(target=feed, args=(source, mailbox, live, speed), daemon=True)
    feeder.start()
    latencies, processed = [], 0
    while max_frames is None or processed < max_frames:
        item = mailbox.take()
        if item is None:
            break
        index, frame, arrived = item
        start = time.perf_counter()
        session = pipe.session(frame)  # vision + the image prefix, once for all questions
        answers = [session.ask(q, keep=False, max_new_tokens=max_new_tokens, speculative=speculative,
                               deadline_s=deadline_s) for q in questions]
        done = time.perf_counter()
        latencies.append((done - start) * 1000)
        processed += 1
        row = {"frame": index, "latency_ms": round(latencies[-1], 1), "waited_ms": round((start - arrived) * 1000, 1),
               "dropped_so_far": mailbox.dropped,
               "answers": [{"question": q, "text": a.text, "ttft_ms": round(a.ttft_ms, 1), "cached_tokens": a.cached_tokens}
                           for q, a in zip(questions, answers)]}
        if as_json:
            print(json.dumps(row), file=out, flush=True)
        else:
            said = " | ".join(f"{q} -> {a.text.strip()}" for q, a in zip(questions, answers))
            print(f"frame {index:4d}  {latencies[-1]:7.1f} ms  dropped {mailbox.dropped:3d}  {said}", file=out, flush=True)
    mailbox.close()
    summary = {"processed": processed, "dropped": mailbox.dropped,
               "mean_latency_ms": round(float(np.mean(latencies)), 1) if latencies else 0.0,
               "p90_latency_ms": round(float(np.percentile(latencies, 90)), 1) if latencies else 0.0}
    print(json.dumps({"summary": summary}) if as_json else f"summary: {summary}", file=out, flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle folder (default: the most recent bundle in the store)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file")
    src.add_argument("--frames", help="a folder of frames")
    src.add_argument("--camera", type=int, help="a camera index (OpenCV)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of --frames (default 10) or override the video's")
    p.add_argument("--speed", type=float, default=1.0, help="replay a file this many times faster than real time")
    p.add_argument("--question", action="append", dest="questions", help="a question to ask per frame (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--deadline-s", type=float, default=None, help="per-answer time limit")
    p.add_argument("--no-speculative", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from runtime.bundle import find_latest_bundle
    from runtime.errors import RuntimeErrorBase
    from runtime.pipeline import Pipeline
    from runtime.store import store_root

    try:
        bundle = args.bundle or find_latest_bundle(store_root())
        if bundle is None:
            raise RuntimeErrorBase("no bundle in the store; export one (dream-export --model smolvlm-tiny) or pass --bundle")
        pipe = Pipeline.from_bundle(bundle)
        source, live = open_source(args)
        run(pipe, source, args.questions or DEFAULT_QUESTIONS, live, args.speed, args.max_new_tokens, args.max_frames,
            False if args.no_speculative else None, args.deadline_s, as_json=args.json)
    except RuntimeErrorBase as exc:
        print(f"camera_loop: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
