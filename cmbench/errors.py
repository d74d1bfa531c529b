"""Errors that end a command with one line instead of a traceback."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


class JobFailed(RuntimeError):
    """A submitted job ended without its result; the message carries the tail of its log."""


class MissingWeights(FileNotFoundError):
    """A weights file (Inception for FID) is not where it is expected; nothing is downloaded. The message is one
    line: the path, where the file comes from, and the variable that points to its directory."""


class DamagedFile(ValueError):
    """A file that fails its integrity check or does not parse (a flipped bit, a torn write); the message is one
    line naming the file and what became of it."""


class RunDirInUse(RuntimeError):
    """Another process holds a run directory's lock (cmbench.io.locked): two trainers or samplers never interleave."""
