"""Inference backends behind one small interface (ONNX Runtime now; TensorRT where present)."""

from .base import Backend  # noqa: F401
from .select import make_backend  # noqa: F401
