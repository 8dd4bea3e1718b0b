"""Search spaces as data: what a loss declares, how a trial samples it, how stored params decode.

A space is an ordered ``dict`` from a loss keyword to a :class:`Real` or a :class:`Choice`.
The trial parameter names are the keys, except where a declaration says otherwise:

    Real(lo, hi, complement=True)  trial param ``one_minus_<key>`` in [lo, hi]; the loss gets 1 - value
                                   (a beta near 1 is searched on the scale of 1 - beta)
    Real(lo, hi, optional=True)    trial param ``use_<key>`` (True/False), then ``<key>`` only when
                                   True; the loss gets None when False
    Choice(values, kwargs=...)     the trial stores the value; the loss gets ``kwargs[i]`` merged in
                                   instead (ALPA's ``variant`` stores a loss name, "alpa_hill")
    when=(key, values)             sampled only if the earlier parameter ``key`` took one of ``values``

Standard library only: the search, the export and the dashboard read spaces without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Union


@dataclass(frozen=True)
class Real:
    """A float in [low, high] (the sampled quantity's bounds: 1 - value's when ``complement``)."""

    low: float
    high: float
    log: bool = False
    complement: bool = False
    optional: bool = False
    when: tuple[str, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"Real: need finite low <= high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"Real: a log scale needs low > 0, got {self.low}")


@dataclass(frozen=True)
class Choice:
    """One of ``values``; with ``kwargs``, value i stands for the loss keywords ``kwargs[i]``."""

    values: tuple[Any, ...]
    kwargs: tuple[Mapping[str, Any], ...] | None = field(default=None, hash=False)
    when: tuple[str, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values or len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"Choice: need distinct values, got {list(self.values)}")
        if self.kwargs is not None:
            if len(self.kwargs) != len(self.values):
                raise ValueError("Choice: kwargs needs one mapping per value")
            object.__setattr__(self, "kwargs", tuple(dict(k) for k in self.kwargs))

    def loss_kwargs(self, key: str, value: Any) -> dict[str, Any]:
        """What the loss receives for ``value``."""
        if self.kwargs is None:
            return {key: value}
        return dict(self.kwargs[self.values.index(value)])


Param = Union[Real, Choice]
Space = dict[str, Param]


class TrialLike(Protocol):
    """An optuna Trial or FixedTrial, or anything with these two methods."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def trial_param_names(space: Mapping[str, Param]) -> list[str]:
    """Every trial parameter ``space`` can produce, in sampling order."""
    names = []
    for key, p in space.items():
        if isinstance(p, Real) and p.optional:
            names.append(f"use_{key}")
        names.append(f"one_minus_{key}" if isinstance(p, Real) and p.complement else key)
    return names


def _active(key: str, p: Param, seen: Mapping[str, Any]) -> bool:
    if p.when is None:
        return True
    on, values = p.when
    if on not in seen:
        raise ValueError(f"search space: {key!r} depends on {on!r}, which must come earlier")
    return seen[on] in values


def _walk(space: Mapping[str, Param], get_real, get_choice) -> dict[str, Any]:
    """One pass over ``space`` in order; the getters return the trial's (or stored) values."""
    kwargs: dict[str, Any] = {}
    seen: dict[str, Any] = {}  # raw trial values, for `when`
    for key, p in space.items():
        if not _active(key, p, seen):
            continue
        if isinstance(p, Choice):
            seen[key] = value = get_choice(key, p.values)
            if value not in p.values:  # a stored trial from another space
                raise ValueError(f"{key}={value!r} is not one of {list(p.values)}")
            kwargs.update(p.loss_kwargs(key, value))
            continue
        if p.optional and not get_choice(f"use_{key}", (True, False)):
            seen[key] = kwargs[key] = None
            continue
        name = f"one_minus_{key}" if p.complement else key
        value = float(get_real(name, p))
        seen[key] = value
        kwargs[key] = 1.0 - value if p.complement else value
    return kwargs


def sample(trial: TrialLike, space: Mapping[str, Param]) -> dict[str, Any]:
    """Sample ``space`` on ``trial``; returns the loss keyword arguments."""
    return _walk(space,
                 lambda name, p: trial.suggest_float(name, p.low, p.high, log=p.log),
                 lambda name, values: trial.suggest_categorical(name, list(values)))


def decode_trial_params(space: Mapping[str, Param], trial_params: Mapping[str, Any]) -> dict[str, Any]:
    """Stored trial params (``one_minus_beta``, ``use_alpha``, ...) -> the loss keyword arguments.

    Equals what :func:`sample` returned for that trial. A missing or unexpected name raises
    ValueError (the study was run with another space).
    """
    used: set[str] = set()

    def get(name: str, _: Any) -> Any:
        if name not in trial_params:
            raise ValueError(f"trial params lack {name!r}; got {sorted(trial_params)}")
        used.add(name)
        return trial_params[name]

    kwargs = _walk(space, get, get)
    extra = sorted(set(trial_params) - used)
    if extra:
        raise ValueError(f"trial params {extra} are not in the search space "
                         f"(its parameters: {trial_param_names(space)})")
    return kwargs


def _fixed_kwargs(key: str, p: Param, value: Any) -> dict[str, Any]:
    if isinstance(p, Choice):
        if value not in p.values:
            raise ValueError(f"search space: {key}={value!r} is not one of {list(p.values)}")
        return p.loss_kwargs(key, value)
    if value is None and p.optional:
        return {key: None}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"search space: {key} must be a number"
                         f"{' or None' if p.optional else ''}, got {value!r}")
    lo, hi = _loss_bounds(p)
    if not _inside(float(value), lo, hi):
        raise ValueError(f"search space: {key}={value!r} lies outside its declared range [{lo:g}, {hi:g}]")
    return {key: float(value)}


def _loss_bounds(p: Real) -> tuple[float, float]:
    """The declared range in the loss's units (a complement's is 1 - high .. 1 - low)."""
    return (1.0 - p.high, 1.0 - p.low) if p.complement else (p.low, p.high)


def _inside(v: float, lo: float, hi: float) -> bool:
    # 1 - (1 - x) need not round back to x: a bound given as written still counts as inside.
    return (lo <= v or math.isclose(v, lo, rel_tol=1e-12)) and (v <= hi or math.isclose(v, hi, rel_tol=1e-12))


def _narrow_one(key: str, p: Param, override: Any) -> Param:
    if isinstance(p, Choice):
        if not isinstance(override, (list, tuple)) or not override:
            raise ValueError(f"search space: {key} takes a non-empty list of {list(p.values)} "
                             f"or one value, got {override!r}")
        bad = [v for v in override if v not in p.values]
        if bad or len(set(map(repr, override))) != len(override):
            raise ValueError(f"search space: {key}={list(override)!r} must be distinct values among "
                             f"{list(p.values)}")
        # The override's order is kept: an Optuna categorical distribution compares its choices in order.
        kwargs = None if p.kwargs is None else tuple(p.kwargs[p.values.index(v)] for v in override)
        return replace(p, values=tuple(override), kwargs=kwargs)
    if (not isinstance(override, (list, tuple)) or len(override) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in override)):
        raise ValueError(f"search space: {key} takes [low, high] or one number, got {override!r}")
    lo, hi = (float(v) for v in override)
    dlo, dhi = _loss_bounds(p)
    if lo > hi or not (_inside(lo, dlo, dhi) and _inside(hi, dlo, dhi)):
        raise ValueError(f"search space: {key}=[{lo:g}, {hi:g}] must be low <= high inside its "
                         f"declared range [{dlo:g}, {dhi:g}]")
    if p.complement:  # given in the loss's units; clamped so rounding cannot step outside
        return replace(p, low=max(p.low, 1.0 - hi), high=min(p.high, 1.0 - lo))
    return replace(p, low=max(p.low, lo), high=min(p.high, hi))


def narrow(space: Mapping[str, Param], overrides: Mapping[str, Any]) -> tuple[Space, dict[str, Any]]:
    """Restrict ``space``: returns ``(the space still sampled, fixed loss kwargs)``.

    Per key, in the loss's units: ``[low, high]`` narrows a Real (inside its declared range), a
    list narrows a Choice to those values, a single value (None for an optional Real) fixes the
    parameter. A parameter whose ``when`` can no longer hold is dropped.
    """
    unknown = [k for k in overrides if k not in space]
    if unknown:
        raise ValueError(f"search space has no parameter {', '.join(map(repr, unknown))}; "
                         f"declared: {', '.join(space) or '(none)'}")
    out: Space = {}
    fixed: dict[str, Any] = {}
    fixed_raw: dict[str, Any] = {}
    for key, p in space.items():
        if key not in overrides:
            out[key] = p
            continue
        o = overrides[key]
        is_range = isinstance(o, (list, tuple))
        if is_range:
            out[key] = _narrow_one(key, p, o)
        else:
            fixed.update(_fixed_kwargs(key, p, o))
            fixed_raw[key] = o
    # Resolve `when` against fixed or narrowed parameters.
    for key, p in list(out.items()):
        if p.when is None:
            continue
        on, values = p.when
        if on in fixed_raw:
            if fixed_raw[on] in values:
                out[key] = replace(p, when=None)
            else:
                del out[key]
        elif on in out and isinstance(out[on], Choice):
            live = tuple(v for v in values if v in out[on].values)
            if live:
                out[key] = replace(p, when=(on, live))
            else:
                del out[key]
        elif on not in out:
            del out[key]
    return out, fixed


def corners(space: Mapping[str, Param]) -> list[dict[str, Any]]:
    """Trial params at every corner: each Real at low and high, each Choice value, use_* both ways.

    For tests and smoke runs; the count is the product over the active parameters.
    """
    points: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})]  # (trial params, raw values)
    for key, p in space.items():
        nxt = []
        for params, seen in points:
            if not _active(key, p, seen):
                nxt.append((params, seen))
                continue
            if isinstance(p, Choice):
                nxt += [({**params, key: v}, {**seen, key: v}) for v in p.values]
                continue
            name = f"one_minus_{key}" if p.complement else key
            pre = [({**params, f"use_{key}": True}, seen)] if p.optional else [(params, seen)]
            if p.optional:
                nxt.append(({**params, f"use_{key}": False}, {**seen, key: None}))
            nxt += [({**q, name: v}, {**s, key: v}) for q, s in pre for v in dict.fromkeys((p.low, p.high))]
        points = nxt
    return [params for params, _ in points]
