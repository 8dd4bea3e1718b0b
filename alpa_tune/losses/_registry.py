"""One factory over a registry of losses, addressable by name (as timm's ``create_model``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alpa_tune.space import Param, decode_trial_params

from ._base import LossConfigError, TunableLoss

_REGISTRY: dict[str, type[TunableLoss]] = {}
# Search-space names that are an existing loss with some parameters fixed.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"alpa_hill": ("alpa", {"variant": "hill"})}


def register_loss(cls: type[TunableLoss]) -> type[TunableLoss]:
    """Class decorator: make ``cls`` buildable as ``build_loss(cls.name, ...)``."""
    if not cls.name or cls.name in _REGISTRY or cls.name in _ALIASES:
        raise ValueError(f"loss name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_losses() -> list[str]:
    """Every name :func:`build_loss` accepts, aliases such as ``alpa_hill`` included."""
    return sorted([*_REGISTRY, *_ALIASES])


def loss_parameters(name: str) -> list[str]:
    """The parameter names the loss ``name`` accepts (an alias's fixed ones excluded)."""
    cls, fixed = _resolve(name)
    return [p for p in cls.parameter_names() if p not in fixed]


def needs_class_counts(name: str) -> bool:
    """Whether the loss is built from the training class counts (class-balanced, LDAM)."""
    return "class_counts" in loss_parameters(name)


def build_for_counts(name: str, params: dict[str, Any], counts: Sequence[int]) -> TunableLoss:
    """Build ``name`` for a training set with ``counts`` samples per class: losses that need them
    (class-balanced, LDAM) get them as ``class_counts`` (:func:`class_counts_for`), replacing any
    in ``params``; the others ignore them."""
    if not needs_class_counts(name):
        return build_loss(name, **params)
    return build_loss(name, **{**params, "class_counts": class_counts_for(counts)})


def class_counts_for(counts: Sequence[int]) -> list[int]:
    """Samples per class as the count-based losses take them: an absent class counts 1 (n > 0)."""
    return [max(int(c), 1) for c in counts]


def alias_params(name: str) -> dict[str, Any]:
    """The parameters the name ``name`` fixes: an alias's (``alpa_hill``: variant hill), else {}."""
    return dict(_resolve(name)[1])


def loss_search_space(name: str) -> dict[str, Param]:
    """The loss's declared search space; an alias's fixed parameters are not searched."""
    cls, fixed = _resolve(name)
    return {k: p for k, p in cls.search_space().items() if k not in fixed}


def loss_paper_points(name: str) -> list[dict[str, Any]]:
    """The paper's settings as trial params of :func:`loss_search_space` (an alias: those it matches)."""
    cls, fixed = _resolve(name)
    space, points = cls.search_space(), []
    for point in cls.paper_points():
        kwargs = decode_trial_params(space, point)
        if all(kwargs.get(k, v) == v for k, v in fixed.items()):
            points.append({k: v for k, v in point.items() if k not in fixed})
    return points


def loss_paper_setting(name: str) -> dict[str, Any]:
    """The paper's default as :func:`build_loss` kwargs (an alias's fixed ones included).

    Where an alias contradicts the class's default (``alpa_hill`` vs Loss v2), the alias's first
    paper point is its setting (Loss v3).
    """
    cls, fixed = _resolve(name)
    setting = cls.paper_setting()
    if any(setting.get(k, v) != v for k, v in fixed.items()):
        points = loss_paper_points(name)
        if points:
            setting = loss_kwargs(name, points[0])
    return {**setting, **fixed}


def loss_kwargs(name: str, trial_params: dict[str, Any]) -> dict[str, Any]:
    """Stored trial params of ``name``'s space -> :func:`build_loss` kwargs (``variant`` through the alias)."""
    return decode_trial_params(loss_search_space(name), trial_params)


def _resolve(name: str) -> tuple[type[TunableLoss], dict[str, Any]]:
    if name in _ALIASES:
        base, fixed = _ALIASES[name]
        return _REGISTRY[base], fixed
    if name not in _REGISTRY:
        raise LossConfigError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    return _REGISTRY[name], {}


def build_loss(name: str, **params: Any) -> TunableLoss:
    """Build the loss ``name`` with ``params``; unknown names or parameters raise LossConfigError.

    ``build_loss(loss.name, **loss.params)`` rebuilds any loss, which is how exports load.
    """
    cls, fixed = _resolve(name)
    valid = cls.parameter_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise LossConfigError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(p for p in valid if p not in fixed)}")
    for key, value in fixed.items():
        if key in params and params[key] != value:
            raise LossConfigError(f"loss {name!r} fixes {key}={value!r}; got {key}={params[key]!r}")
    return cls(**{**params, **fixed})


