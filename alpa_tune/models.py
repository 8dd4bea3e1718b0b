"""Backbones by name through timm's registry; pretrained weights from the hub or a local file."""

from __future__ import annotations

from pathlib import Path

import torch


class ModelError(ValueError):
    """The model cannot be built as configured (bad name, missing or incompatible checkpoint)."""


def backbone_exists(name: str) -> bool:
    import timm

    return timm.is_model(name)


def create_model(backbone: str, num_classes: int, *, pretrained: bool = False,
                 checkpoint: str | None = None, drop_rate: float = 0.0) -> torch.nn.Module:
    """A fresh timm model with a ``num_classes`` head.

    ``checkpoint`` (a state dict or a timm checkpoint file) wins over ``pretrained``; its
    classifier head is dropped and replaced to fit the classes.
    """
    import timm

    if not timm.is_model(backbone):
        raise ModelError(f"model.backbone: {backbone!r} is not a timm model name")
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(f"model.checkpoint: {path} does not exist")
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
        _load_backbone_weights(model, path)
        return model
    try:
        return timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate)
    except Exception as exc:  # noqa: BLE001 - hub/network failures come in many types
        if not pretrained:
            raise
        raise ModelError(
            f"model.pretrained: could not fetch weights for {backbone!r} ({type(exc).__name__}); "
            "when offline, download them elsewhere and set model.checkpoint = \"/path/to/weights.pth\""
        ) from None


def _load_backbone_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files raise many types
        raise ModelError(f"model.checkpoint: {path} is not a readable PyTorch checkpoint ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelError(f"model.checkpoint: {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = model.get_classifier()
    head_names = {f"{name}" for name, module in model.named_modules() if module is head}
    own = model.state_dict()
    # Drop the old head (and anything else whose shape no longer fits the new class count).
    usable = {k: v for k, v in state.items()
              if k in own and own[k].shape == v.shape and not any(k.startswith(h + ".") for h in head_names)}
    if not usable:
        raise ModelError(f"model.checkpoint: no weights in {path} fit backbone {type(model).__name__}")
    model.load_state_dict(usable, strict=False)
