"""Are the losses' differences on the held-out split real? A paired, stratified, two-level bootstrap.

Setting: L losses, each trained with the same S seeds (seed k of every loss used the same split
and initial seed) and scored on the same N held-out images with targets ``y``. All values here
are fractions in 0..1 (not percent), except in :func:`verdict`'s text.

The maths. Let class c have n_c > 0 test images (K such classes) and h[l,s,i] = 1 when loss l,
seed s is right on image i. Balanced accuracy and the observed figures are

    BA[l,s] = (1/K) sum_c (1/n_c) sum_{i in c} h[l,s,i]
    m[l]    = (1/S) sum_s BA[l,s]                       (observed mean over seeds)
    b       = argmax_l m[l]                             (first label on ties)
    d[l]    = m[l] - m[b] <= 0                          (observed difference to the best)

Replicate r draws S seeds with replacement (counts v[r,s], sum_s v[r,s] = S) and, within each
class c, n_c images of that class with replacement (counts w[r,i], sum_{i in c} w[r,i] = n_c),
independently of the seeds; the same v and w serve every loss. Then

    BA*[l,s,r] = (1/K) sum_c (1/n_c) sum_{i in c} w[r,i] h[l,s,i]
    m*[l,r]    = (1/S) sum_s v[r,s] BA*[l,s,r]
    d*[l,r]    = m*[l,r] - m*[b,r]

and the 95 % intervals are the 2.5 and 97.5 percentiles of m*[l,.] and d*[l,.] over r. A loss is
distinguishable from the best when its interval of d* excludes 0.

Why this procedure:

* Paired. Var(m[l] - m[b]) = Var(m[l]) + Var(m[b]) - 2 Cov(m[l], m[b]). An image that is hard
  for one loss is hard for all, and a seed with an unlucky split or start hurts all, so the
  covariance is large and positive. Drawing the same images and seeds for every loss keeps it in
  d*, which removes the shared difficulty; independent draws per loss would ignore it and give
  intervals far too wide to separate anything.
* Stratified. Balanced accuracy weighs every class by 1/K whatever its size. Plain resampling
  would change n_c from replicate to replicate and could drop a rare class altogether (changing K,
  i.e. the metric itself); the held-out split is itself stratified, so each class keeps its size
  and only which of its images are seen varies.
* Two levels. The spread of m has two sources, seed-to-seed training noise (roughly
  sigma_seed^2 / S) and the finite test sample (sigma_test^2); resampling only images would miss
  the first, only seeds the second. Seeds and images are crossed (every seed sees every image), and
  resampling both factors independently is mildly conservative (Owen 2007, "the pigeonhole
  bootstrap"). With S == 1 the seed draw always returns the one seed, so that level is a no-op;
  with S of 2 to 5 it is coarse, so treat a borderline interval as borderline.

Computation: the inner sum for class c is a matrix product of the 0/1 hits with the integer
counts w, so every per-class hit count is an exact integer in float64 whatever order BLAS adds
in; two losses with the same predictions therefore get bit-identical replicates and a difference
of exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alpa_tune.metrics import balanced_accuracy_from_hits

# Replicates per block: bounds the (images x replicates) count matrix to ~32 MB of float64.
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class LossStats:
    """One loss's bootstrap result; every figure is a fraction in 0..1 (balanced accuracy)."""

    label: str
    mean: float  # observed mean over seeds of balanced accuracy
    ci95: tuple[float, float]  # 95 % percentile interval of the mean
    difference: float  # observed mean minus the best's (<= 0; 0 for the best)
    difference_ci95: tuple[float, float]  # 95 % percentile interval of the difference
    best: bool  # highest observed mean (first label on ties)
    distinguishable: bool  # the difference interval excludes 0 (never true for the best)


def _integer_array(values: object, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of class indices, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{what}: expected integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def _validate(targets: np.ndarray, predictions: Mapping[str, Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N,) and the hits h[l, s, i] as bool (L, S, N); ValueError on any mismatch."""
    y = _integer_array(targets, "targets")
    if y.size == 0:
        raise ValueError("targets: empty; there is nothing to compare on")
    if (y < 0).any():
        raise ValueError(f"targets: class indices must be >= 0, got {int(y.min())}")
    if not predictions:
        raise ValueError("predictions: no losses given")
    counts = {label: len(runs) for label, runs in predictions.items()}
    for label, count in counts.items():
        if count == 0:
            raise ValueError(f"predictions[{label!r}]: no seeds")
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{label} has {count}" for label, count in counts.items())
        raise ValueError(f"predictions: every loss needs the same seeds (paired), but {listed}")
    hits = np.empty((len(predictions), next(iter(counts.values())), y.size), dtype=bool)
    for l, (label, runs) in enumerate(predictions.items()):
        for s, run in enumerate(runs):
            pred = _integer_array(run, f"predictions[{label!r}][{s}]")
            if pred.size != y.size:
                raise ValueError(
                    f"predictions[{label!r}][{s}]: {pred.size} predictions for {y.size} targets "
                    "(every seed must be scored on the same held-out images)")
            hits[l, s] = pred == y
    return y, hits


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) float counts: row r says how often each of n items came up in n draws with replacement."""
    draws = rng.integers(0, n, size=(size, n)) + np.arange(size)[:, None] * n  # offset per row for one bincount
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def paired_bootstrap(
    targets: np.ndarray,
    predictions: Mapping[str, Sequence[np.ndarray]],
    *,
    replicates: int = 2000,
    seed: int = 0,
) -> list[LossStats]:
    """Balanced accuracy per loss with 95 % intervals of its mean and of its difference to the best.

    ``targets`` (N,) class indices; ``predictions[label][k]`` (N,) predicted classes of seed k,
    the same seeds in the same order for every label. Results in ``predictions``' label order,
    fractions in 0..1. Deterministic for a given ``seed``. See the module docstring for the maths.
    """
    if replicates < 1:
        raise ValueError(f"replicates: must be >= 1, got {replicates}")
    y, hits = _validate(targets, predictions)
    labels = list(predictions)
    n_losses, n_seeds, n_images = hits.shape
    classes = np.flatnonzero(np.bincount(y))
    members = [np.flatnonzero(y == c) for c in classes]  # image indices of each present class
    support = np.array([m.size for m in members])

    def balanced(class_hits: list[np.ndarray]) -> np.ndarray:
        return balanced_accuracy_from_hits(np.stack(class_hits, axis=-1), support)

    # Observed: (L, S) balanced accuracies through the same core as the replicates.
    observed = balanced([hits[..., m].sum(axis=-1) for m in members])
    means = observed.mean(axis=1)
    best = int(np.argmax(means))  # argmax takes the first of equal means: label order breaks ties

    rng = np.random.default_rng(seed)
    flat = hits.reshape(n_losses * n_seeds, n_images).astype(np.float64)
    per_class = [flat[:, m] for m in members]
    block = max(1, _BLOCK_CELLS // n_images)
    boot = np.empty((n_losses, replicates))
    for start in range(0, replicates, block):
        size = min(block, replicates - start)
        # Seed level: counts v (size, S) of S draws with replacement; all-ones when S == 1.
        v = _counts(rng, n_seeds, size) if n_seeds > 1 else np.ones((size, 1))
        # Image level, per class: counts w (size, n_c) of n_c draws with replacement within the class.
        class_hits = []
        for h_c, n_c in zip(per_class, support):
            class_hits.append(h_c @ _counts(rng, int(n_c), size).T)  # (L*S, size) exact integer hit counts
        ba = balanced(class_hits).reshape(n_losses, n_seeds, size)
        # Elementwise over seeds (not a BLAS product) so identical losses stay bit-identical.
        total = np.zeros((n_losses, size))
        for s in range(n_seeds):
            total += v[:, s] * ba[:, s, :]
        boot[:, start:start + size] = total / n_seeds

    diffs = boot - boot[best]
    mean_ci = np.percentile(boot, [2.5, 97.5], axis=1)
    diff_ci = np.percentile(diffs, [2.5, 97.5], axis=1)
    results = []
    for l, label in enumerate(labels):
        low, high = float(diff_ci[0, l]), float(diff_ci[1, l])
        results.append(LossStats(
            label=label,
            mean=float(means[l]),
            ci95=(float(mean_ci[0, l]), float(mean_ci[1, l])),
            difference=float(means[l] - means[best]),
            difference_ci95=(low, high),
            best=l == best,
            distinguishable=l != best and not low <= 0.0 <= high,
        ))
    return results


def verdict(stats: Sequence[LossStats], *, wide: float = 0.10) -> str:
    """One line of plain English on :func:`paired_bootstrap`'s result.

    ``wide`` (a fraction; 0.10 = 10 points): when the widest interval of a mean is wider, the
    line adds that the held-out split is small and ``training.holdout`` can be raised.
    """
    if not stats:
        raise ValueError("verdict: no losses given")
    best = next(s for s in stats if s.best)
    others = [s for s in stats if not s.best]
    same = [s.label for s in others if not s.distinguishable]
    worse = [s.label for s in others if s.distinguishable]
    if not others:
        line = f"{best.label} is the only loss ({best.mean * 100:.1f} %); there is nothing to rank."
    elif not worse:
        line = (f"The data cannot rank the losses: {best.label} has the highest mean ({best.mean * 100:.1f} %), "
                "but every 95 % interval of difference to it covers 0.")
    else:
        parts = [f"{best.label} is best ({best.mean * 100:.1f} %)"]
        if same:
            verb = "is" if len(same) == 1 else "are"
            parts.append(f"{', '.join(same)} {verb} not distinguishable from it")
        verb, whose = ("is", "its") if len(worse) == 1 else ("are", "their")
        parts.append(f"{', '.join(worse)} {verb} worse ({whose} 95 % interval of difference excludes 0)")
        line = "; ".join(parts) + "."
    widest = max(s.ci95[1] - s.ci95[0] for s in stats)
    if widest > wide:
        line += (f" The held-out split is small (the widest 95 % interval of a mean spans {widest * 100:.1f} "
                 "points); raise training.holdout for a sharper comparison.")
    return line
