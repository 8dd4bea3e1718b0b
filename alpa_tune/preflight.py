"""Before any work: every check that needs more than the config file itself.

The config module validates what a TOML file can say on its own; this module checks it against
the registries (data sources, timm backbones), the storage and the data, so that a bad name, a
wrong password or a class too small for the folds is one line before a worker starts.
``run``'s setup path: config -> preflight -> study -> launcher, each called once, top-down.
"""

from __future__ import annotations

from collections.abc import Callable

from alpa_tune.config import ConfigError, StudyConfig
from alpa_tune.data import ImageDataset, ProgressFn, available_sources, load_dataset
from alpa_tune.losses import available_losses
from alpa_tune.models import backbone_exists
from alpa_tune.search import declared_space
from alpa_tune.storage import check_free_space, journal_or_sqlite_path, open_storage, require_folder
from alpa_tune.training import make_folds, split_holdout


def check_registries(config: StudyConfig) -> None:
    """Names the config can only hold as strings: the data source, the loss and its space's keys,
    the timm backbone."""
    sources = available_sources()
    if config.data.source not in sources:
        raise ConfigError(f"data.source: {config.data.source!r} is not one of {', '.join(sources)}")
    losses = available_losses()
    if config.search.loss not in losses:
        raise ConfigError(f"search.loss: {config.search.loss!r} is not one of {', '.join(losses)}")
    if not config.search.tunes_alpa:
        declared_space(config.search)  # every search.space key names a parameter the loss declares
    if not backbone_exists(config.model.backbone):
        raise ConfigError(f"model.backbone: {config.model.backbone!r} is not a timm model name "
                          "(see timm.list_models())")


def check_storage(url: str) -> None:
    """A bad file, a wrong password or a full disk is one line now; nothing is created, so bad
    input found later leaves no new storage file behind."""
    path = journal_or_sqlite_path(url)
    if path is None:
        open_storage(url)  # PostgreSQL: reachable, password right, database there
        return
    require_folder(url, path)
    check_free_space(path.parent, "storage")
    if path.exists():
        open_storage(url)  # an existing file must be a storage we can read (and a whole journal)


def prepare(config: StudyConfig, progress: ProgressFn | None = None,
            announce: Callable[[str], None] | None = None) -> ImageDataset:
    """Check the registries, then load (decode and cache) the data once and check that every
    class can fill the folds: workers then find the cache built and the data known good."""
    check_registries(config)
    dataset = load_dataset(config.data, progress=progress)
    dev_index, _ = split_holdout(dataset, config.training.holdout, config.training.seed)
    make_folds(dataset, dev_index, config.training.folds, config.training.seed)  # refuses a class too small
    if announce is not None:
        counts = ", ".join(str(n) for n in dataset.class_counts())
        announce(f"data: {len(dataset.labels)} images, {dataset.num_classes} classes ({counts})")
    return dataset
