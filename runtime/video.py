"""Video input (SmolVLM2): decode a file with PyAV, sample frames the way the model's video processor does, and
say which frames were taken when (the prompt announces them). PyAV and num2words are optional runtime
dependencies: ``pip install 'dream-export[video]'``; without them a video input gets one clear error.

Sampling follows transformers' ``SmolVLMVideoProcessor.sample_frames`` (manifest ``preprocessing.video``): about
``fps`` frames per second of video, at most ``max_frames``, spread evenly from the first to the last frame, skipping
``skip_secs`` at both ends when the video is long enough. Metadata is read as transformers' PyAV reader reads it
(frame count and average rate of the first video stream)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv")


@dataclass(frozen=True)
class Video:
    """A video file given as a message part (``{"type": "video", "video": path}``)."""

    path: Path


def is_video_path(item) -> bool:
    return isinstance(item, (str, Path)) and Path(item).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class SampledVideo:
    frames: np.ndarray          # [F,H,W,3] uint8 RGB, the sampled frames in order
    timestamps: list[float]     # seconds, one per frame
    duration: float             # seconds (frame count / average rate)


def sample_indices(total: int, video_fps: float, duration: float, fps: float, max_frames: int,
                   skip_secs: float = 1.0) -> np.ndarray:
    """Frame indices to keep (transformers' SmolVLM rule; see the module docstring)."""
    desired = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * video_fps)
        end = int(total - skip_secs * video_fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def read_video(path, fps: float, max_frames: int, skip_secs: float = 1.0) -> SampledVideo:
    try:
        import av
    except ImportError as exc:
        raise InputError(f"{path}: reading a video needs PyAV, which is not installed: pip install av "
                         f"(or pip install 'dream-export[video]')") from exc
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            total, rate = int(stream.frames), stream.average_rate
            if not rate or total <= 0:
                raise InputError(f"{path}: the video stream has no frame count or frame rate "
                                 f"({total} frames, rate {rate}); expected a file that states both (e.g. MP4)")
            rate = float(rate)
            duration = total / rate
            keep = sample_indices(total, rate, duration, fps, max_frames, skip_secs)
            wanted, frames, i = set(int(i) for i in keep), [], -1
            for i, frame in enumerate(container.decode(video=0)):
                if i > keep[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as exc:
        raise InputError(f"{path}: could not decode the video ({exc})") from exc
    if len(frames) != len(keep):
        raise InputError(f"{path}: the stream states {total} frames but only {i + 1} could be decoded")
    return SampledVideo(np.stack(frames), [i / rate for i in keep.tolist()], duration)


def number_words(n: int) -> str:
    try:
        from num2words import num2words
    except ImportError as exc:
        raise InputError("a video prompt spells its frame count in words, which needs num2words: pip install num2words "
                         "(or pip install 'dream-export[video]')") from exc
    return num2words(n)
