"""dream-export's torch-free runtime: numpy, onnxruntime, tokenizers, pillow (TensorRT where present).

Nothing here imports torch or transformers, nor anything from ``dream_export`` or ``calibration``.
"""

__all__ = ["Pipeline", "Bundle", "TreeSpec"]


def __getattr__(name):  # lazy: importing the package loads no heavy library
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "Bundle":
        from .bundle import Bundle

        return Bundle
    if name == "TreeSpec":
        from .tree import TreeSpec

        return TreeSpec
    raise AttributeError(name)
