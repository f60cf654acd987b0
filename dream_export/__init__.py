"""dream-export: the torch side (targets, drafter, training, ONNX export, engine build, CLIs).

The torch-free runtime lives in the sibling package ``runtime``; arrows only point from here to it.
"""

__version__ = "0.1.0"
