"""Heads and their evaluation on synthetic features: the math alone, no photos, no server."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from handlers.heads import HEADS, LinearHead, _holdout_mask, build_head
from training.data import normalised_class_name
from training.evaluation import draw_confusion, evaluate, mean_ci95


def _blobs(num_classes=3, per_class=12, dim=32, centre_seed=0, noise_seed=0):
    """Separable clusters around random centres plus a large shared offset (like ImageNet features).
    The same ``centre_seed`` with another ``noise_seed`` is a fresh draw of the same classes."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(centre_seed)) * 2
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(1000 + noise_seed))
    return centres[labels] + noise + 10.0, labels


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_fits_generalises_and_round_trips(kind):
    features, labels = _blobs()
    head = build_head(kind, features.shape[1], 3)
    summary = head.fit(features, labels)
    members = summary if kind == "ensemble" else {kind: summary}
    if "linear" in members:
        assert members["linear"]["weight_decay"] in LinearHead.WEIGHT_DECAYS
        assert members["linear"]["train_accuracy"] >= 0.95
    if "prototype" in members:
        assert members["prototype"]["scale"] > 1.0  # a fitted temperature, not the initial value's neighbourhood of 0
    assert head(features).shape == (len(labels), 3)
    fresh, fresh_labels = _blobs(noise_seed=1)  # same classes, new samples
    assert (head(fresh).argmax(1) == fresh_labels).float().mean() >= 0.9
    copy = build_head(kind, features.shape[1], 3)
    copy.load_state_dict(head.state_dict())
    assert torch.equal(copy(fresh), head(fresh))


def test_unknown_head_and_fit_options_are_refused():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("nearest", 8, 2)
    features, labels = _blobs()
    with pytest.raises(TypeError):
        build_head("prototype", features.shape[1], 3).fit(features, labels, weight_decai=0.1)


def test_linear_head_keeps_augmented_views_of_one_image_together():
    """Held-out rows are whole images: views of a held-out image never leak into its training."""
    labels = torch.arange(4).repeat_interleave(10)
    groups = torch.arange(40).repeat_interleave(3)
    held = _holdout_mask(labels.repeat_interleave(3), groups, 0.25, seed=1)
    for group in groups.unique():
        assert held[groups == group].all() or not held[groups == group].any()
    assert 0 < held.float().mean() < 0.5


def test_linear_head_with_one_image_per_class_still_fits():
    features, labels = _blobs(per_class=1)
    head = build_head("linear", features.shape[1], 3)
    summary = head.fit(features, labels)
    assert summary["weight_decay"] > 0
    assert (head(features).argmax(1) == labels).all()


def test_evaluation_metrics_and_confusion_png(tmp_path):
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = evaluate(probabilities, labels, ["ants", "bees"])
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["confusion"] == [[1, 0], [1, 2]]
    assert metrics["per_class"]["ants"]["precision"] == pytest.approx(0.5)
    assert metrics["per_class"]["bees"]["recall"] == pytest.approx(2 / 3)
    png = draw_confusion(metrics["confusion"], ["ants", "bees"], tmp_path / "c.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100
    mean, half = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and 0.2 < half < 0.3


def test_class_name_normalisation():
    assert normalised_class_name("T-Shirt") == normalised_class_name("t_shirt") == normalised_class_name(" t shirt")
    assert normalised_class_name("shirt") != normalised_class_name("t-shirt")


def test_ensemble_averages_its_members_probabilities_and_fits_class_means_on_plain_views_only():
    features, labels = _blobs()
    views = features + torch.randn(features.shape, generator=torch.Generator().manual_seed(7)) * 3.0
    rows, row_labels = torch.cat([features, views]), torch.cat([labels, labels])
    groups = torch.cat([torch.arange(len(labels))] * 2)
    head = build_head("ensemble", features.shape[1], 3)
    head.fit(rows, row_labels, groups=groups, power=0.5, weight_decay=1e-2)
    members = head.members
    fresh, _ = _blobs(noise_seed=2)
    expected = (members["linear"](fresh).softmax(1) + members["prototype"](fresh).softmax(1)) / 2
    assert torch.allclose(head(fresh).softmax(1), expected, atol=1e-6)
    alone = build_head("prototype", features.shape[1], 3)
    alone.fit(features, labels, power=0.5)
    assert torch.allclose(members["prototype"].prototypes, alone.prototypes, atol=1e-6)
    assert float(head.power) == 0.5 and members["linear"].power == 0.5
