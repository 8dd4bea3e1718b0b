"""The search space and how it is searched: the paper's seed points, sampling a trial into a
loss setting, the sampler and the pruner. Torch-free: read-only commands and export use it.
"""

from __future__ import annotations

from typing import Any

import optuna

from alpa_tune.config import ConfigError, SearchConfig, SpaceConfig, StudyConfig

# The paper's three settings (section 6.1): Loss v1, v2 (the reported ALPA) and v3 (Hill).
PAPER_POINTS: tuple[dict[str, Any], ...] = (
    {"alpha": 1.0, "beta": 1.0, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
    {"alpha": 0.875, "beta": 1.625, "gamma_pos": 0.0, "gamma_neg": 4.0, "variant": "alpa"},
    {"alpha": 1.25, "beta": 2.0, "gamma_pos": 3.0, "gamma_neg": 2.0, "variant": "alpa_hill"},
)
SPACE_PARAMS = ("alpha", "beta", "gamma_pos", "gamma_neg")


def suggest(trial: optuna.Trial, search: SearchConfig) -> dict[str, Any]:
    """Sample one point of the configured space (enqueued points come back unchanged)."""
    params = {name: trial.suggest_float(name, *getattr(search.space, name)) for name in SPACE_PARAMS}
    params["variant"] = trial.suggest_categorical("variant", list(search.variants))
    return params


def loss_spec(params: dict[str, Any], space: SpaceConfig) -> tuple[str, dict[str, Any]]:
    """Trial params -> ``(loss name, build_loss kwargs)``: the one mapping export and training share."""
    kwargs = {name: float(params[name]) for name in SPACE_PARAMS}
    kwargs.update(clip=space.clip, focusing=space.focusing,
                  variant="hill" if params.get("variant") == "alpa_hill" else "plain")
    if kwargs["variant"] == "hill":
        kwargs["hill_lambda"] = space.hill_lambda
    return "alpa", kwargs


def declared_space(search: SearchConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Another loss than ALPA: (its declared space narrowed by ``search.space``, the fixed kwargs).

    Reads the loss registry (torch): only the trial and the preflight call it, never a read-only
    command. A key the loss does not declare, or a range outside its declaration, is a ConfigError.
    """
    from alpa_tune.losses import loss_search_space
    from alpa_tune.space import narrow

    try:
        return narrow(loss_search_space(search.loss), search.space)
    except ValueError as exc:
        raise ConfigError(f"search.space ({search.loss}): {exc}") from None


def suggest_loss(trial: optuna.Trial, search: SearchConfig) -> tuple[str, dict[str, Any]]:
    """Sample one loss setting: ``(loss name, build_loss kwargs)``. ALPA keeps its trial params
    (alpha, beta, gamma_pos, gamma_neg, variant); another loss samples its declared space."""
    if search.tunes_alpa:
        return loss_spec(suggest(trial, search), search.space)
    from alpa_tune.space import sample

    space, fixed = declared_space(search)
    return search.loss, {**fixed, **sample(trial, space)}


def paper_points(search: SearchConfig) -> list[dict[str, Any]]:
    """The paper's settings that lie inside the configured space and variants (another loss: its
    paper's recommended points, when its space is not narrowed)."""
    if not search.tunes_alpa:
        from alpa_tune.losses import loss_paper_points

        return loss_paper_points(search.loss) if not search.space else []
    inside = []
    for point in PAPER_POINTS:
        if point["variant"] not in search.variants:
            continue
        if all(getattr(search.space, n)[0] <= point[n] <= getattr(search.space, n)[1] for n in SPACE_PARAMS):
            inside.append(point)
    return inside


def make_sampler(search: SearchConfig, rank: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker gets seed + rank, or parallel workers would propose the same startup trials."""
    seed = search.seed + rank
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=search.n_startup_trials)
    if search.sampler == "tpe":
        # constant_liar: running trials count as "bad" so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.n_startup_trials, constant_liar=True,
                                          multivariate=True)
    raise ValueError(f"search.sampler: no sampler named {search.sampler!r}")


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    search, t = config.search, config.training
    steps = t.folds if search.report == "fold" else t.folds * t.epochs
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    if search.pruner == "median":
        # Judge a trial only after its first report step (a fold, or the first fold's epochs).
        warmup = 1 if search.report == "fold" else t.epochs
        return optuna.pruners.MedianPruner(n_startup_trials=search.n_startup_trials, n_warmup_steps=warmup)
    if search.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=max(1, steps // 2))
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    raise ValueError(f"search.pruner: no pruner named {search.pruner!r}")


