"""What every loss shares: hyperparameter validation, target handling, compute dtype.

Hyperparameters live as plain Python values on the module, validated once when set, so a
new trial changes them with :meth:`TunableLoss.set_params` at no cost: nothing is rebuilt,
nothing recompiles.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from alpa_tune.errors import BadInput
from alpa_tune.space import Param

REDUCTIONS = ("sum", "mean")


class LossConfigError(BadInput):
    """An unknown loss name, an unknown parameter, or a parameter value the loss cannot take."""


class TunableLoss(nn.Module):
    """Base class: a loss whose hyperparameters are exposed as :attr:`params` and cheap to change.

    Subclasses define an ``__init__`` with explicit keyword parameters (the signature is the
    parameter list that errors quote), call :meth:`_configure` with them, and implement
    :meth:`_validate` (check and normalise a full parameter dict) and ``forward``.

    Two hooks for the training loop: :attr:`head`, the classifier the logits must come from
    (training builds the model with it), and :meth:`set_epoch`, called before every epoch.
    """

    name: ClassVar[str] = ""
    # "linear": any logits (timm's head); "cosine": logits are cosines in [-1, 1] (models.NormedLinear).
    head: ClassVar[str] = "linear"

    def __init__(self) -> None:
        super().__init__()
        self._params: dict[str, Any] = {}

    # -- search space (the ranges the loss's paper explores; see alpa_tune.space) ------------
    @classmethod
    def search_space(cls) -> dict[str, Param]:
        """The tuned parameters; empty: nothing to tune, one trial per seed is the study."""
        return {}

    @classmethod
    def paper_points(cls) -> list[dict[str, Any]]:
        """The paper's recommended settings as trial params, enqueued first in a study."""
        return []

    @classmethod
    def paper_setting(cls) -> dict[str, Any]:
        """The paper's default as build kwargs: the untuned baseline of a comparison."""
        return {}

    # -- hyperparameters --------------------------------------------------------------------
    @classmethod
    def parameter_names(cls) -> list[str]:
        """The keyword parameters this loss accepts, in signature order."""
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    @property
    def params(self) -> dict[str, Any]:
        """All hyperparameters as plain JSON-ready values; ``build_loss(name, **params)`` rebuilds it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._params.items()}

    def set_params(self, **changes: Any) -> TunableLoss:
        """Change some hyperparameters in place (validated as a whole); returns ``self``."""
        unknown = sorted(set(changes) - set(self._params))
        if unknown:
            raise LossConfigError(
                f"loss {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"valid parameters: {', '.join(self.parameter_names())}")
        valid = self._validate({**self._params, **changes})
        self._params.clear()
        self._params.update(valid)
        self._params_changed()
        return self

    def _configure(self, params: Mapping[str, Any]) -> None:
        self._params.update(self._validate(dict(params)))
        self._params_changed()

    def _set(self, **values: Any) -> None:
        """Plain attributes without nn.Module.__setattr__'s bookkeeping (they are no tensors):
        set_params runs once per trial, or, in the benchmark, before every call."""
        self.__dict__.update(values)

    def _validate(self, params: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params_changed(self) -> None:
        """Hook: recompute derived constants after the hyperparameters changed."""

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Hook: the training loop calls it before epoch ``epoch`` (0-based) of ``total_epochs``.

        A schedule over training (LDAM's deferred re-weighting) lives here; most losses have none.
        """

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._params.items())

    # -- validation helpers ------------------------------------------------------------------
    def _error(self, message: str) -> LossConfigError:
        return LossConfigError(f"loss {self.name!r}: {message}")

    def _real(self, params: dict[str, Any], key: str, *, low: float | None = None,
              high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
        value = params[key]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._error(f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self._error(f"{key} must be finite, got {value!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise self._error(f"{key} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and (value > high or (high_open and value == high)):
            raise self._error(f"{key} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
        params[key] = value
        return value

    def _choice(self, params: dict[str, Any], key: str, choices: Sequence[str]) -> str:
        value = params[key]
        if value not in choices:
            raise self._error(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def _reduction(self, params: dict[str, Any]) -> str:
        return self._choice(params, "reduction", REDUCTIONS)

    def _class_counts(self, params: dict[str, Any]) -> tuple[int, ...]:
        counts = params.get("class_counts")
        if counts is None:
            raise self._error("class_counts is required (the number of training samples per class)")
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().tolist()
        elif isinstance(counts, np.ndarray):
            counts = counts.tolist()
        if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) < 2:
            raise self._error(f"class_counts must be a sequence of at least 2 counts, got {counts!r}")
        out = []
        for c in counts:
            if isinstance(c, bool) or not float(c).is_integer() or c < 1:
                raise self._error(f"class_counts must hold positive integers, got {list(counts)!r}")
            out.append(int(c))
        params["class_counts"] = tuple(out)
        return params["class_counts"]


# -- inputs -------------------------------------------------------------------------------------

def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exactness tests); everything else computes in float32.

    Half-precision logits are upcast: their sums overflow float16 and their transcendental
    functions lose the digits that keep the loss finite at large |logit|.
    """
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_inputs(loss: str, logits: torch.Tensor, target: torch.Tensor,
                 num_classes: int | None = None) -> tuple[bool, torch.Tensor]:
    """Validate shapes; return ``(is_index, target)``.

    Index targets are int64 ``(N,)``; float (or bool/int) ``(N, C)`` targets are one-hot,
    multi-hot or soft and come back in the compute dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"{loss}: logits must be (N, C), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{loss}: logits must be floating point, got {logits.dtype}")
    n, c = logits.shape
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{loss}: logits have {c} classes but class_counts has {num_classes}")
    if target.dim() == 1:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"{loss}: a 1-d target must hold int64 class indices, got {target.dtype}")
        if target.shape[0] != n:
            raise ValueError(f"{loss}: target has {target.shape[0]} labels for {n} rows of logits")
        return True, target.long()
    if target.dim() == 2:
        if tuple(target.shape) != (n, c):
            raise ValueError(f"{loss}: a 2-d target must match logits {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        return False, target.to(compute_dtype(logits))
    raise ValueError(f"{loss}: target must be (N,) class indices or (N, C) one-hot/multi-hot, "
                     f"got shape {tuple(target.shape)}")


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) int64 -> (N, C) float one-hot."""
    out = torch.zeros(index.shape[0], num_classes, dtype=dtype, device=index.device)
    return out.scatter_(1, index[:, None], 1.0)


def reduce(total: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """"sum" as the reference; "mean" divides by the batch size N (not by N * C)."""
    return total if reduction == "sum" else total / max(n, 1)
