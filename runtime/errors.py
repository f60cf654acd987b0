"""The runtime's errors: one base class; messages name the file/field, what was found, what was expected."""


class RuntimeErrorBase(Exception):
    """Base class of every error the runtime raises on purpose (the CLI prints it as one line)."""


class BundleError(RuntimeErrorBase):
    pass


class InputError(RuntimeErrorBase):
    pass
