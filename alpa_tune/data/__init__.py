"""Dataset sources behind one registry: ``load_dataset(config.data)`` -> :class:`ImageDataset`.

Each source lives in its own module and registers itself by name; the registry imports
a source module only when that source is asked for, so listing names stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from alpa_tune.data._types import DataError, ImageDataset, ProgressFn

if TYPE_CHECKING:
    from alpa_tune.config import DataConfig

__all__ = ["DataError", "ImageDataset", "ProgressFn", "available_sources", "load_dataset", "register_source"]

# source name -> module that registers it
_SOURCE_MODULES = {
    "digits-lt": "alpa_tune.data.digits",
    "synthetic": "alpa_tune.data.synthetic",
    "medmnist": "alpa_tune.data.medmnist",
    "csv": "alpa_tune.data.csv_source",
    "folder": "alpa_tune.data.folder",
}
_LOADERS: dict[str, Callable[..., ImageDataset]] = {}


def register_source(name: str) -> Callable[[Callable[..., ImageDataset]], Callable[..., ImageDataset]]:
    """Decorator: register ``loader(cfg: DataConfig, progress: ProgressFn | None) -> ImageDataset``."""

    def decorate(loader: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        _LOADERS[name] = loader
        return loader

    return decorate


def available_sources() -> list[str]:
    return list(_SOURCE_MODULES)


def load_dataset(
    cfg: DataConfig,
    progress: ProgressFn | None = None,
    *,
    log: Callable[[str], None] | None = None,
    verify: Literal["auto", "full"] = "auto",
) -> ImageDataset:
    """Load (and, for file sources, decode once into the on-disk cache) the configured dataset.

    ``log`` receives the one-line notices of the cache (a damaged entry being rebuilt); without
    it they go to the ``alpa_tune.data`` logger, printed bare on stderr when logging is not
    configured. ``verify``: ``"auto"`` checks a cached entry's checksums unless a check of the
    unchanged file passed in the last 10 minutes; ``"full"`` always checks (see ``data.cache``).
    """
    if cfg.source not in _SOURCE_MODULES:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(_SOURCE_MODULES)}")
    if cfg.source not in _LOADERS:
        importlib.import_module(_SOURCE_MODULES[cfg.source])
    from alpa_tune.data.cache import cache_options

    with cache_options(log, verify):
        return _LOADERS[cfg.source](cfg, progress)
