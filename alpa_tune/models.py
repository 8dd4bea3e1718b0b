"""Backbones by name through timm's registry; pretrained weights from the hub or a local file.

The classifier is timm's linear head, or a cosine one (:class:`NormedLinear`) for losses whose
margins and scale are defined on cosines (LDAM: a loss declares its ``head``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from alpa_tune.errors import BadInput

HEADS = ("linear", "cosine")


class ModelError(BadInput):
    """The model cannot be built as configured (bad name, missing or incompatible checkpoint)."""


def backbone_exists(name: str) -> bool:
    import timm

    return timm.is_model(name)


class NormedLinear(torch.nn.Module):
    """Cosine classifier (Cao et al. 2019's code): out = normalize(x, dim=1) @ normalize(W, dim=0).

    Every logit is the cosine between a feature and a class weight, so lies in [-1, 1]; the loss
    supplies the scale (LDAM's ``s``). Computed in float32 outside autocast: LDAM's margins
    (0.5 and less, multiplied by s = 30) should not compete with bf16's rounding of the cosines.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The reference initialisation: uniform, then each column renormed to norm 1e-5 and scaled by 1e5.
        weight = torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def model_head(model: torch.nn.Module) -> str:
    """"cosine" when the model's classifier is a :class:`NormedLinear`, else "linear"."""
    get_classifier = getattr(model, "get_classifier", None)  # timm models; a test's stand-in may lack it
    return "cosine" if get_classifier is not None and isinstance(get_classifier(), NormedLinear) else "linear"


def create_model(backbone: str, num_classes: int, *, pretrained: bool = False,
                 checkpoint: str | None = None, drop_rate: float = 0.0,
                 head: str = "linear") -> torch.nn.Module:
    """A fresh timm model with a ``num_classes`` head.

    ``checkpoint`` (a state dict or a timm checkpoint file) wins over ``pretrained``; its
    classifier head is dropped and replaced to fit the classes. ``head="cosine"`` replaces
    timm's linear classifier by a :class:`NormedLinear` of the same shape.
    """
    if head not in HEADS:
        raise ModelError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
    model = _create_timm_model(backbone, num_classes, pretrained=pretrained, checkpoint=checkpoint,
                               drop_rate=drop_rate)
    if head == "cosine":
        _replace_classifier(model, num_classes)
    return model


def _replace_classifier(model: torch.nn.Module, num_classes: int) -> None:
    """Swap the model's classifier for a NormedLinear, found by identity as the checkpoint loader does."""
    old = model.get_classifier()
    in_features = getattr(old, "in_features", None)
    if not isinstance(old, torch.nn.Linear) or in_features is None:
        raise ModelError(f"a cosine head needs a linear classifier to replace; {type(model).__name__} has "
                         f"{type(old).__name__}")
    name = next(n for n, m in model.named_modules() if m is old)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child,
            NormedLinear(in_features, num_classes))


def _create_timm_model(backbone: str, num_classes: int, *, pretrained: bool, checkpoint: str | None,
                       drop_rate: float) -> torch.nn.Module:
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
            f"model.pretrained: no pretrained weights for {backbone!r} in the local cache and the hub cannot be "
            f"reached ({type(exc).__name__}); on a machine with internet run "
            f"`python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\"` and copy "
            "~/.cache/huggingface here, or download the weights file (model.safetensors or .pth) and set "
            "model.checkpoint = \"/path/to/weights\""
        ) from None


def _load_backbone_weights(model: torch.nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrap the names; unwrap them.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    head = model.get_classifier()
    head_names = {name for name, module in model.named_modules() if module is head}
    is_head = lambda key: any(key.startswith(h + ".") for h in head_names)  # noqa: E731
    own = model.state_dict()
    # The old head never fits the new classes: drop it, keep the fresh one.
    usable = {k: v for k, v in state.items()
              if k in own and not is_head(k) and isinstance(v, torch.Tensor) and own[k].shape == v.shape}
    # Every backbone tensor must come from the file; a partial load (a checkpoint of another
    # variant, say convnext_tiny for convnext_base) would otherwise train from half-random weights.
    wanted = [k for k in own if not is_head(k) and not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in usable]
    if missing:
        example = missing[0]
        found = getattr(state.get(example), "shape", None)
        why = f"shape {tuple(found)} vs {tuple(own[example].shape)}" if found is not None else "not in the file"
        raise ModelError(
            f"model.checkpoint: {path} fits only {len(wanted) - len(missing)} of {len(wanted)} backbone tensors of "
            f"{type(model).__name__} (e.g. {example}: {why}); was it saved from another backbone?"
        )
    model.load_state_dict(usable, strict=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, a plain state dict, or a timm/trainer checkpoint."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS errors
            raise ModelError(f"model.checkpoint: {path} is not a readable safetensors file ({exc.__class__.__name__})") from None
    try:
        # timm's train.py stores its argparse.Namespace next to the weights: allow just that.
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files raise many types
        raise ModelError(f"model.checkpoint: {path} is not a readable PyTorch checkpoint ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.checkpoint: {path} holds no state dict")
    return state
