"""Errors that end a command with one line instead of a traceback."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


class JobFailed(RuntimeError):
    """A submitted job ended without its result; the message carries the tail of its log."""


class MissingWeights(FileNotFoundError):
    """A weights file (Inception for FID) is not where it is expected; nothing is downloaded. The message is one
    line: the path, where the file comes from, and the variable that points to its directory."""


class UnverifiedWeights(ValueError):
    """A weights file whose SHA-256 is not the official file's: refused before it is loaded (loading a pickle or a
    TorchScript file can run code), unless the user opts in with CMBENCH_UNVERIFIED_WEIGHTS=1."""


class DamagedFile(ValueError):
    """A file that fails its integrity check, does not parse (a flipped bit, a torn write) or does not match its run
    (samples, references, records): the message is one line naming the file, what is wrong and the fix."""


class RunDirInUse(RuntimeError):
    """Another process holds a run directory's lock (cmbench.io.locked): two trainers or samplers never interleave."""
