"""Error types whose message is shown to the user as one line (the CLI prints them without a traceback)."""


class NfedError(Exception):
    """Base class: a problem the user can act on (bad input, missing file, unavailable device)."""


class DataError(NfedError):
    """A data file or folder is missing, unreadable or does not follow its format."""


class CheckpointError(NfedError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class DeviceError(NfedError):
    """The requested compute device cannot be used on this machine."""


class ConfigError(NfedError):
    """Options or a configuration that contradict each other or are out of range."""


class OutputError(NfedError):
    """An output could not be written (disk full, read-only file system, no permission); nothing was left
    half-written under its final name."""


class TrainingError(NfedError):
    """Training cannot go on (e.g. the loss became NaN or infinite: the run diverged)."""



def one_line(exc: BaseException) -> str:
    """A crash as one line: nfed errors by their message, others prefixed with their type."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, NfedError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
