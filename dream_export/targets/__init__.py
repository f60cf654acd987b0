"""Target adapters: one module per VLM family. The exporter core only talks to ``TargetAdapter``."""

from .base import TargetAdapter, adapter_for, register_adapter  # noqa: F401
from . import idefics3  # noqa: F401  (registers the SmolVLM / Idefics3 family)
from . import llava  # noqa: F401  (registers LLaVA-1.5 and LLaVA-NeXT)
from . import gemma3  # noqa: F401  (registers Gemma 3)
from . import pixtral  # noqa: F401  (registers Pixtral: LLaVA with a Pixtral tower)
from . import qwen2_5_vl  # noqa: F401  (registers Qwen2.5-VL)
