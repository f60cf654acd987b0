"""Inference backends behind one small interface (ONNX Runtime now; TensorRT where present)."""

from .base import Backend, make_backend  # noqa: F401
