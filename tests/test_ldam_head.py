"""LDAM trains on the cosine head it declares (logits in [-1, 1]), other losses on timm's linear
one; deferred re-weighting switches on at its epoch through the training loop's set_epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpa_tune import training
from alpa_tune.config import StudyConfig
from alpa_tune.data import load_dataset
from alpa_tune.losses import TunableLoss, build_loss
from alpa_tune.losses._baselines import effective_number_weights
from alpa_tune.models import ModelError, NormedLinear, create_model, model_head
from alpa_tune.training import Trainer, split_holdout, train_and_evaluate

CPU = torch.device("cpu")


def tiny(*overrides: str) -> StudyConfig:
    return StudyConfig(name="t").replace([
        "data.source=synthetic", "data.image_size=16", "data.num_classes=4", "data.samples_per_class=30",
        "data.imbalance_ratio=3.0", "training.epochs=1", "training.batch_size=32", "training.augment=false",
        *overrides,
    ])


def factory(name: str, **params):
    def build(counts: np.ndarray) -> TunableLoss:
        extra = {"class_counts": [int(c) for c in counts]} if name in ("ldam", "cb") else {}
        return build_loss(name, **params, **extra)
    return build


def test_normed_linear_outputs_cosines() -> None:
    torch.manual_seed(0)
    head = NormedLinear(16, 5)
    x = torch.randn(64, 16) * 50  # large features: the normalisation, not the scale, bounds the output
    out = head(x)
    w = torch.nn.functional.normalize(head.weight, dim=0)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(5))
    torch.testing.assert_close(out, torch.nn.functional.normalize(x, dim=1) @ w)
    assert out.abs().max() <= 1 + 1e-6


def test_cosine_model_replaces_timm_classifier() -> None:
    torch.manual_seed(0)
    model = create_model("resnet10t", 5, head="cosine")
    assert isinstance(model.get_classifier(), NormedLinear) and model_head(model) == "cosine"
    assert model_head(create_model("resnet10t", 5)) == "linear"
    logits = model(torch.randn(8, 3, 16, 16) * 3)
    assert logits.shape == (8, 5) and logits.abs().max() <= 1 + 1e-6
    with pytest.raises(ModelError, match="head must be one of"):
        create_model("resnet10t", 5, head="arc")


@pytest.mark.parametrize("name,head", [("ldam", "cosine"), ("ce", "linear")])
def test_trainer_builds_the_loss_head(name: str, head: str) -> None:
    config = tiny()
    counts = np.array([30, 17, 10, 10])
    trainer = Trainer(config, counts, factory(name), seed=3, device=CPU, steps_per_epoch=1)
    assert trainer.loss_fn.head == head and model_head(trainer.model) == head
    # The loss is built before the model and draws no random numbers: the initialisation is a fold's as before.
    torch.manual_seed(3)
    expected = create_model(config.model.backbone, 4, head=head)
    for (key, got), want in zip(trainer.model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=key)


def test_a_model_builder_ignoring_the_head_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "create_model", lambda *a, head="linear", **k: create_model(*a, **k))
    with pytest.raises(ValueError, match="the loss needs a cosine head"):
        Trainer(tiny(), np.array([30, 17, 10, 10]), factory("ldam"), seed=0, device=CPU, steps_per_epoch=1)


def run_recording(config: StudyConfig, name: str, monkeypatch: pytest.MonkeyPatch, **params):
    """Train once through train_and_evaluate; record the models built and every loss call's logits."""
    dataset = load_dataset(config.data)
    dev, held = split_holdout(dataset, config.training.holdout, config.training.seed)
    models, calls = [], []
    real_create = training.create_model
    monkeypatch.setattr(training, "create_model", lambda *a, **k: models.append(real_create(*a, **k)) or models[-1])
    build = factory(name, **params)

    def recording(counts: np.ndarray) -> TunableLoss:
        loss = build(counts)
        loss.register_forward_hook(lambda module, inputs, output: calls.append(
            (module, inputs[0].detach().clone(), inputs[1].clone(), output.detach().clone(),
             getattr(module, "epoch", None))))
        return loss

    result = train_and_evaluate(config, dataset, dev, held, recording, seed=0, device=CPU)
    return result, models, calls


def test_ldam_trains_on_cosines_and_ce_on_the_linear_head(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("training.epochs=2")
    _, models, calls = run_recording(config, "ldam", monkeypatch)
    assert [model_head(m) for m in models] == ["cosine"] and len(calls) >= 4
    assert max(float(logits.abs().max()) for _, logits, *_ in calls) <= 1 + 1e-6
    _, models, calls = run_recording(config, "ce", monkeypatch)
    assert [model_head(m) for m in models] == ["linear"] and calls


def test_deferred_reweighting_through_the_training_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("training.epochs=4")
    _, _, calls = run_recording(config, "ldam", monkeypatch, drw=True, drw_start=0.5)  # from epoch 2 of 4
    loss = calls[0][0]
    counts = loss.params["class_counts"]
    assert loss.drw_weights == pytest.approx(effective_number_weights(tuple(counts), 0.9999))
    plain = build_loss("ldam", class_counts=counts)
    weighted = build_loss("ldam", class_counts=counts, reweight=True)
    epochs = sorted({epoch for *_, epoch in calls})
    assert epochs == [0, 1, 2, 3]
    for _, logits, target, value, epoch in calls:
        expected = (weighted if epoch >= 2 else plain)(logits, target)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    # Uniform and effective-number weights differ on these counts: the check above tells them apart.
    _, logits, target, *_ = calls[-1]
    assert not torch.allclose(plain(logits, target), weighted(logits, target), rtol=1e-3)


def test_ldam_training_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("training.epochs=2")
    first, *_ = run_recording(config, "ldam", monkeypatch, drw=True)
    again, *_ = run_recording(config, "ldam", monkeypatch, drw=True)
    assert first.balanced_accuracy == again.balanced_accuracy and first.recall == again.recall
    assert [e.train_loss for e in first.epochs] == [e.train_loss for e in again.epochs]


def test_params_round_trip_keeps_drw() -> None:
    loss = build_loss("ldam", class_counts=[50, 20, 5], drw=True, drw_start=0.75, beta=0.999)
    again = build_loss(loss.name, **loss.params)
    assert again.params == loss.params and again.params["drw"] is True and again.params["drw_start"] == 0.75
    assert again.head == "cosine" and build_loss("ce").head == "linear"
    again.set_epoch(2, 4)
    assert not again.reweighting and again.drw_epoch(4) == 3
    again.set_epoch(3, 4)
    assert again.reweighting
    assert again.set_params(drw=False).params["drw"] is False and not again.reweighting


def test_compare_offers_ldam_drw() -> None:
    from alpa_tune.compare import loss_entries, parse_losses

    (entry,) = loss_entries(parse_losses("ldam_drw"), {})
    assert entry.name == "ldam" and entry.params["drw"] is True and entry.params["drw_start"] == 0.8
