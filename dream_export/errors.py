"""The exporter's errors: one base class, messages that say what was found and what was expected."""


class DreamExportError(Exception):
    """Base class of every error dream-export raises on purpose."""


class ModelNotFoundError(DreamExportError):
    pass


class ValidationError(DreamExportError):
    pass
