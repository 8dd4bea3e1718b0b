"""Finite everywhere: every loss, every search-space value, every finite logit, every dtype.

Property tests (hypothesis) over the paper's search space (alpha, beta in [0.5, 2]; gammas in
[0, 5], fractional included; clip in [0, 0.2]) and logits from -1e4 to 1e4, with the values
where sigmoid, exp or the probabilities' complements round off in each dtype drawn on purpose.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpa_tune.losses import build_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOGIT_CLIP = [math.log(c / (1 - c)) for c in (0.05, 0.2)]
# Where sigmoid(x) or 1 - sigmoid(x) rounds to 0 or 1, or exp overflows, in some dtype.
SPECIAL = [0.0, 1e-4, 8.0, 11.1, 16.7, 17.5, 36.8, 88.8, 104.0, 745.2, 1e3, 1e4, 65504.0]
SPECIAL = sorted({s for v in SPECIAL for s in (v, -v)} | set(LOGIT_CLIP))

# ALPA_TUNE_HYPOTHESIS_EXAMPLES=5000 searches harder (minutes); the default keeps the suite fast.
common = settings(max_examples=int(os.environ.get("ALPA_TUNE_HYPOTHESIS_EXAMPLES", "60")),
                  deadline=None, suppress_health_check=[HealthCheck.too_slow])
gammas = st.one_of(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 5.0]), st.floats(0.0, 5.0))
weights = st.floats(0.5, 2.0)
clips = st.one_of(st.sampled_from([0.0, 0.05, 0.2]), st.floats(0.0, 0.2))
logit_values = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, allow_nan=False))


@st.composite
def batches(draw):
    """(logits float64 (N, C), int64 labels (N,), dtype)."""
    n = draw(st.integers(1, 5))
    c = draw(st.integers(2, 5))
    values = draw(st.lists(logit_values, min_size=n * c, max_size=n * c))
    labels = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.tensor(values, dtype=torch.float64).view(n, c), torch.tensor(labels), dtype


def assert_finite(loss, logits64, labels, dtype, *, onehot=False):
    x = logits64.to(dtype).requires_grad_()
    target = torch.nn.functional.one_hot(labels, x.shape[1]).to(dtype) if onehot else labels
    value = loss(x, target)
    value.backward()
    assert torch.isfinite(value), (value, x)
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all(), (x, x.grad)
    assert value.item() >= 0 or loss.params.get("variant") == "hill"


@common
@given(batch=batches(), alpha=weights, beta=weights, gamma_pos=gammas, gamma_neg=gammas, clip=clips,
       focusing=st.sampled_from(["reference", "single"]), variant=st.sampled_from(["plain", "hill"]),
       onehot=st.booleans())
def test_alpa_finite(batch, alpha, beta, gamma_pos, gamma_neg, clip, focusing, variant, onehot):
    loss = build_loss("alpa", alpha=alpha, beta=beta, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
                      clip=clip, focusing=focusing, variant=variant)
    assert_finite(loss, *batch, onehot=onehot)


@common
@given(batch=batches(), gamma_pos=gammas, gamma_neg=gammas, clip=clips, onehot=st.booleans())
def test_asl_finite(batch, gamma_pos, gamma_neg, clip, onehot):
    assert_finite(build_loss("asl", gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip), *batch,
                  onehot=onehot)


@common
@given(batch=batches(), gamma=gammas, alpha=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_focal_finite(batch, gamma, alpha):
    assert_finite(build_loss("focal", gamma=gamma, alpha=alpha), *batch)


@common
@given(batch=batches(), base=st.sampled_from(["ce", "bce", "focal"]), gamma=gammas,
       beta=st.sampled_from([0.0, 0.9, 0.999, 0.9999]), onehot=st.booleans())
def test_class_balanced_finite(batch, base, gamma, beta, onehot):
    logits, labels, dtype = batch
    counts = [1000 // (i + 1) for i in range(logits.shape[1])]
    loss = build_loss("cb", class_counts=counts, base=base, gamma=gamma, beta=beta)
    assert_finite(loss, logits, labels, dtype, onehot=onehot)


@common
@given(batch=batches(), reweight=st.booleans(), onehot=st.booleans())
def test_ldam_bce_ce_finite(batch, reweight, onehot):
    logits, labels, dtype = batch
    counts = [1000 // (i + 1) ** 2 for i in range(logits.shape[1])]
    for loss in (build_loss("ldam", class_counts=counts, reweight=reweight), build_loss("bce"),
                 build_loss("ce")):
        assert_finite(loss, logits, labels, dtype, onehot=onehot)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["alpa", "alpa_hill", "asl", "focal", "bce", "ce", "cb", "ldam"])
def test_finite_under_cpu_autocast(name, amp_dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6)
    with torch.no_grad():  # logits spread over +-1e4, through the underflow points
        model.weight.mul_(torch.logspace(-1, 3.5, 6)[:, None])
    features = torch.randn(64, 8)
    labels = torch.randint(0, 6, (64,))
    kwargs = {"class_counts": [60, 30, 15, 8, 4, 2]} if name in ("cb", "ldam") else {}
    if name.startswith("alpa"):
        kwargs.update(gamma_pos=0.3, gamma_neg=0.7)
    loss_fn = build_loss(name, **kwargs)
    with torch.autocast("cpu", dtype=amp_dtype):
        logits = model(features)
        assert logits.dtype == amp_dtype
        loss = loss_fn(logits, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all() and torch.isfinite(model.bias.grad).all()
