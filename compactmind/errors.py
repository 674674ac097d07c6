"""Project errors: one base class and a few specific kinds.

Every message is one sentence a user can act on; the CLI prints it without a traceback.
"""


class CompactMindError(Exception):
    """Base class of every error compactmind raises on purpose."""


class ConfigError(CompactMindError):
    """A setting, flag or study file is invalid."""


class RegistryError(CompactMindError):
    """A method is unknown, or declares itself wrongly."""


class PipelineError(CompactMindError):
    """A pipeline text does not parse or names unknown methods or parameters."""


class IncompatiblePipelineError(CompactMindError):
    """A method cannot be applied to this model with these parameters (the candidate is invalid)."""


class CalibrationError(CompactMindError):
    """Calibration data is missing or too short for a method that needs it."""


class ModelError(CompactMindError):
    """The model cannot be found or loaded."""


class DataError(CompactMindError):
    """The text data cannot be read, is empty, or is too short."""


class StorageError(CompactMindError):
    """The study storage cannot be opened, or the study does not exist or does not match."""
