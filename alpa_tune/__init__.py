"""alpa-tune: hyperparameter search for the ALPA loss.

Public entry points: :func:`build_loss` (any loss by name) and :func:`load_loss` (the tuned
loss from an export such as ``best.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "build_loss", "load_loss"]

if TYPE_CHECKING:
    import torch


def build_loss(name: str, **params: Any) -> torch.nn.Module:
    """A loss module by name (``alpa``, ``asl``, ``focal``, ``bce``, ``ce``, ``cb``, ``ldam``)."""
    from alpa_tune.losses import build_loss as _build

    return _build(name, **params)


def load_loss(path: str, rank: int = 1) -> torch.nn.Module:
    """The tuned loss from an alpa-tune export file (JSON, TOML or Python), ready to use.

    ``rank`` picks among the records of a ``--top K`` export (1 = the best).
    """
    from alpa_tune.records import load_loss as _load

    return _load(path, rank)
