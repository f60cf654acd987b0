"""The DREAM drafter model, its EAGLE-style ablation, their configuration and the factory that picks one."""

from .config import DrafterConfig  # noqa: F401
from .model import DreamDrafter, build_drafter  # noqa: F401
