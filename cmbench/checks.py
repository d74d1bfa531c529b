"""The checks of a resolved config that need the registries (losses, networks, data layouts; so torch): run while
the workflow is planned, before any job, beside the schema's own checks (cmbench.config), which need nothing."""
import torch

from cmbench import losses
from cmbench.config import ConfigError, Experiment, ImageData, RunConfig
from cmbench.nets import build_model


def check_run(cfg: RunConfig, data: bool = True) -> RunConfig:
    """Checks that need the registries (import torch): the loss name and its parameters, and (data) that an image
    dataset's files are there. Returns the config with the loss's defaults filled in, so that the printed config
    and its hash say everything."""
    params = losses.check(cfg)
    if data and isinstance(cfg.dataset, ImageData):
        from cmbench.data.images import check_image_data
        check_image_data(cfg.dataset)     # the files exist and have a known layout (not loaded)
    return cfg.model_copy(update={"loss": params.model_dump(mode="json")})


def resolve_run(exp: Experiment, suite: str, dataset: str, variant: str, seed: int, overrides: dict | None = None,
                scale: str | None = None, chain: tuple[str, ...] = ()) -> RunConfig:
    """A run's checked config. A student of a trained teacher carries the teacher's training hash (teacher.hash),
    so that the student's own hash changes, and it retrains, whenever its teacher's training does; a teacher may
    have a trained teacher of its own (TCM's stage 2 → its ECT stage 1 → EDM). `chain`: the students below."""
    cfg = check_run(exp.resolve(suite, dataset, variant, seed, overrides, scale))
    if cfg.teacher is None or cfg.teacher.source != "run":
        return cfg
    where = f"config {suite}/{dataset}/{variant}"
    if cfg.teacher.variant in (*chain, variant):
        raise ConfigError(f"{where}: the teacher chain {' → '.join((*chain, variant, cfg.teacher.variant))} loops")
    if cfg.teacher.hash is not None:
        raise ConfigError(f"{where}: teacher.hash is filled in by cmbench (the teacher run's training hash): remove it")
    t = resolve_run(exp, suite, dataset, cfg.teacher.variant, seed, overrides, scale, (*chain, variant))
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"hash": t.hash})})


def check_init(student: RunConfig, teacher: RunConfig) -> None:
    """A student that starts from its teacher's weights (teacher.init_student) must have the teacher's
    network: the same parameter names and shapes (built on the meta device: no memory, no init cost), and a
    preconditioning that reads the teacher's network as it was trained (a TrigFlow student's trigflow_net is
    checked by its loss, in check_run)."""
    where = f"config {student.run.suite}/{student.run.dataset}/{student.run.variant}"
    if teacher.precond.name != "edm":
        raise ConfigError(f"{where}: init_student needs an EDM teacher, not precond {teacher.precond.name!r}")
    if student.precond.c_noise_scale != teacher.precond.c_noise_scale:
        raise ConfigError(f"{where}: precond.c_noise_scale {student.precond.c_noise_scale} differs from the "
                          f"teacher's {teacher.precond.c_noise_scale}")
    with torch.device("meta"):
        s, t = (build_model(c).state_dict() for c in (student, teacher))
    diff = sorted(k for k in s.keys() | t.keys() if k not in s or k not in t or s[k].shape != t[k].shape)
    if diff:
        raise ConfigError(f"{where}: init_student needs the teacher's network ({teacher.run.variant}), but "
                          f"{len(diff)} parameter(s) differ, e.g. {diff[0]}")
