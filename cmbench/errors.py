"""Errors that end a command with one line instead of a traceback."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""
