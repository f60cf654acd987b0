"""The DREAM drafter model and its configuration."""

from .model import DrafterConfig, DreamDrafter  # noqa: F401
