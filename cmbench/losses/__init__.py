"""Loss registry: a variant's `loss.name` picks a registered class; its `Params` model checks the rest."""
import importlib
import re

from pydantic import ValidationError

from cmbench.config import ConfigError, RunConfig, format_validation_error

LOSSES: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str):
    """Class decorator. Names are lower-case identifiers, unique; the class must define a `Params` model."""
    def deco(cls):
        if not _NAME.match(name):
            raise ValueError(f"loss name {name!r} must be a lower-case identifier")
        if name in LOSSES:
            raise ValueError(f"loss name {name!r} is already registered by {LOSSES[name].__qualname__}")
        if not hasattr(cls, "Params"):
            raise TypeError(f"loss {name!r}: class {cls.__qualname__} has no Params model")
        LOSSES[name] = cls
        return cls
    return deco


def build(cfg: RunConfig, teacher=None):
    """The loss object for a run; a ConfigError (one line) for an unknown name, bad parameters or a loss that
    cannot work with the rest of the config. `teacher` may be None when only checking."""
    name, where = cfg.loss["name"], f"config {cfg.run.variant}: loss"
    if name not in LOSSES:
        raise ConfigError(f"{where}.name {name!r} is not a registered loss (known: {', '.join(sorted(LOSSES))})")
    cls = LOSSES[name]
    try:
        params = cls.Params.model_validate(cfg.loss)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None
    if cls.needs_teacher and cfg.teacher is None:
        raise ConfigError(f"{where} {name!r} distils a teacher: set teacher.source (analytic or run)")
    try:
        cls.check(params, cfg)
    except ValueError as e:
        raise ConfigError(f"{where} {name!r}: {e}") from None
    return cls(params, cfg, teacher)


for _module in ("ct", "ict", "cd", "edm", "ect", "scm"):
    importlib.import_module(f"cmbench.losses.{_module}")
