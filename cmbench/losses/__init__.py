"""Loss registry: a variant's `loss.name` picks a registered class; its `Params` model checks the rest. Every
module of this package is imported once, so a new loss is a new file with a `@register`ed class."""
import importlib
import pkgutil
import re
import typing

from pydantic import ValidationError

from cmbench.config import ConfigError, RunConfig, Strict, format_validation_error
from cmbench.losses.base import Loss

LOSSES: dict[str, type[Loss]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str):
    """Class decorator. Names are lower-case identifiers, unique; the class is a Loss whose `Params` is a strict
    model with the field `name: Literal[<name>]` (what a config's loss.name is checked against)."""
    def deco(cls):
        where = f"loss {name!r} ({cls.__qualname__})"
        if not _NAME.match(name):
            raise ValueError(f"{where}: the name must be a lower-case identifier")
        if name in LOSSES:
            raise ValueError(f"{where}: the name is already registered by {LOSSES[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, Loss)):
            raise TypeError(f"{where}: not a subclass of cmbench.losses.base.Loss")
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and issubclass(params, Strict)):
            raise TypeError(f"{where}: Params must be a cmbench.config.Strict model (extra keys forbidden)")
        field = params.model_fields.get("name")
        if field is None or typing.get_args(field.annotation) != (name,):
            raise TypeError(f"{where}: Params.name must be Literal[{name!r}]")
        LOSSES[name] = cls
        return cls
    return deco


def check(cfg: RunConfig):
    """The loss's validated parameters (its defaults filled in); a ConfigError (one line) for an unknown name,
    bad parameters or a loss that cannot work with the rest of the config."""
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
    return params


def build(cfg: RunConfig, teacher=None, model=None) -> Loss:
    """The loss object for a run. `teacher` may be None where the loss is not called; `model` (the network the
    loss trains) where the loss has no learned parts of its own."""
    return LOSSES[cfg.loss["name"]](check(cfg), cfg, teacher, model)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
