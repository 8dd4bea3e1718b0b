"""Model factory: local checkpoints in the formats people bring, and the offline pretrained error."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alpa_tune.models import ModelError, create_model

BACKBONE = "resnet10t"  # small and quick to build


def trained_like(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(BACKBONE, num_classes)


def assert_backbone_loaded(model: torch.nn.Module, source: torch.nn.Module) -> None:
    own, theirs = model.state_dict(), source.state_dict()
    for key in ("conv1.0.weight", "layer4.0.conv2.weight", "layer4.0.bn2.running_var"):
        assert torch.equal(own[key], theirs[key]), key
    assert model.get_classifier().out_features == 3
    assert not torch.equal(own["fc.weight"][:3], theirs["fc.weight"][:3].reshape(own["fc.weight"].shape))


def test_plain_state_dict_loads_and_head_is_replaced(tmp_path: Path) -> None:
    source = trained_like()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = create_model(BACKBONE, 3, checkpoint=str(tmp_path / "w.pth"))
    assert_backbone_loaded(model, source)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_timm_training_checkpoint_with_wrapped_names(tmp_path: Path) -> None:
    # timm's train.py: {"state_dict", "args" (argparse.Namespace), ...}, saved from DDP ("module.").
    source = trained_like()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "arch": BACKBONE, "state_dict": state, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "checkpoint.pth.tar")
    assert_backbone_loaded(create_model(BACKBONE, 3, checkpoint=str(tmp_path / "checkpoint.pth.tar")), source)


def test_compiled_model_and_safetensors_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = trained_like()
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, tmp_path / "compiled.pt")
    assert_backbone_loaded(create_model(BACKBONE, 3, checkpoint=str(tmp_path / "compiled.pt")), source)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert_backbone_loaded(create_model(BACKBONE, 3, checkpoint=str(tmp_path / "model.safetensors")), source)


def test_checkpoint_of_another_backbone_is_refused(tmp_path: Path) -> None:
    torch.save(create_model("resnet18", 10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match=r"fits only \d+ of \d+ backbone tensors"):
        create_model(BACKBONE, 3, checkpoint=str(tmp_path / "r18.pth"))


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_model(BACKBONE, 3, checkpoint=str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        create_model(BACKBONE, 3, checkpoint=str(tmp_path / "junk.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        create_model(BACKBONE, 3, checkpoint=str(tmp_path / "junk.safetensors"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="holds no state dict"):
        create_model(BACKBONE, 3, checkpoint=str(tmp_path / "list.pth"))


def test_unknown_backbone() -> None:
    with pytest.raises(ModelError, match="not a timm model name"):
        create_model("no_such_net", 3)


def test_offline_pretrained_without_checkpoint_says_how_to_provide_one(tmp_path: Path) -> None:
    # A fresh process: the hub reads HF_HUB_OFFLINE when imported. Empty caches, so nothing is found.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    code = (
        "from alpa_tune.models import ModelError, create_model\n"
        "try:\n"
        f"    create_model({BACKBONE!r}, 3, pretrained=True)\n"
        "except ModelError as exc:\n"
        "    print('MODELERROR', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("MODELERROR"))
    assert "model.pretrained" in line and "model.checkpoint" in line and BACKBONE in line
