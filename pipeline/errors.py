"""User-facing errors. The CLI prints a FewscanError as one line and exits 2; anything else is a bug."""


class FewscanError(Exception):
    """An error the user can fix. The message names the bad value and what would fix it."""


class ConfigError(FewscanError):
    """A YAML file or command-line option is invalid (unknown key, wrong type, missing file)."""


class DataError(FewscanError):
    """The input data cannot be used (nothing readable, too few patients for an episode, ...)."""


class ScanRejectedError(DataError):
    """One scan refused for one of ingest's reasons; `reason` is the code (`pipeline.ingest.reasons`), so
    callers branch on the code, not on the wording of the message."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class UpstreamError(FewscanError):
    """An upstream MLflow run is missing, unfinished, or of the wrong stage."""


class TrackingError(FewscanError):
    """The MLflow store cannot be reached or stays locked past the retry budget."""


class StageFailed(FewscanError):
    """A stage of the chain failed; the message names the stage, the error and the FAILED run. The CLI exits
    1 for it (not 2: the input was valid). Defined here, not in chain.py, so that the CLI can catch it
    without importing the chain (torch, mlflow) before a command is validated."""
