"""The math of "none of these" and of ``--head auto``, fast and without a server: rejection rule,
its calibration and serialisation, open-set metrics, cross-validated head choice.

The rules and heads are numpy; torch draws the seeded synthetic features (and is the reference of
the full-covariance formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from handlers.arrays import l2_normalise
from handlers.heads import HEADS, build_head, head_from_state
from handlers.rejection import (KnnRejection, RelativeMahalanobisRejection, rule_for_labels,
                                unbiased_lower_quantile, validate_keep)
from training.auto_head import Candidate, candidates, choose_head, stratified_folds
from training.evaluation import auroc, fpr_at_keep, openset_confusion


# Small synthetic problems are separable: a weak weight decay makes L-BFGS chase a vanishing loss for
# seconds. These tests check the choice, not the search space: one strong decay keeps them fast.
FAST_SPACE = [Candidate("prototype", 1.0), Candidate("prototype", 0.5),
              Candidate("linear", 1.0, weight_decay=1e-2), Candidate("linear", 0.5, weight_decay=1e-2)]


def _blobs(num_classes=3, per_class=20, dim=32, seed=0):
    """Separable clusters plus a large shared offset (like ImageNet features), and far-away photos."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = (centres[labels] + torch.randn(len(labels), dim, generator=generator) + 10.0).relu()
    others = (torch.randn(50, dim, generator=generator) * 3 + torch.randn(dim, generator=generator) * 8 + 10.0).relu()
    return features.numpy(), labels.numpy(), others.numpy()


@pytest.mark.parametrize("value", [0, -0.5, 1.01, "abc", "", "nan", "inf", None, "0.9x"])
def test_keep_outside_0_1_is_refused(value):
    with pytest.raises(ValueError):
        validate_keep(value)


@pytest.mark.parametrize("value, expected", [("1", 1.0), (0.9, 0.9), ("0.5", 0.5), ("1e-3", 0.001)])
def test_keep_in_0_1_is_accepted(value, expected):
    assert validate_keep(value) == expected


def test_rule_calibration_keeps_the_asked_share_of_training_photos_and_never_scores_a_photo_against_itself():
    features, labels, others = _blobs()
    # Each photo twice: as its plain view and as an "augmented view" that is an exact copy. Scored
    # against its own copy a photo would get cosine 1; leave-one-out must not see it.
    rows = np.concatenate([features, features])
    groups = np.concatenate([np.arange(len(features))] * 2)
    rule = KnnRejection(features.shape[1])
    summary = rule.fit(rows, groups, keep=0.9)
    assert summary["calibration_photos"] == len(features) and summary["bank_rows"] == 2 * len(features)
    assert rule.calibration.max() < 0.9999
    kept = (rule.calibration >= rule.threshold).mean()
    assert abs(float(kept) - 0.9) <= 1.5 / len(features)
    # Stricter keep -> higher threshold; keep 1 rejects nothing.
    assert rule.threshold_for(0.5) > rule.threshold_for(0.9) > rule.threshold_for(0.99)
    assert rule.threshold_for(1.0) == -math.inf
    # Photos of another kind score lower than training photos: most of them fall below the threshold.
    assert float((rule.score(others) < rule.threshold).mean()) > 0.9
    assert float((rule.score(features) >= rule.threshold).mean()) >= 0.9


def test_threshold_order_statistic_is_at_position_k_plus_1_times_share_clamped_to_the_scores():
    scores = np.arange(1.0, 100.0, dtype=np.float32)  # 99 sorted scores 1..99
    assert unbiased_lower_quantile(scores, 0.05) == 5.0  # position 100 * 0.05
    assert abs(unbiased_lower_quantile(scores, 0.055) - 5.5) < 1e-9
    assert unbiased_lower_quantile(scores, 0.001) == 1.0 and unbiased_lower_quantile(scores, 0.999) == 99.0
    assert unbiased_lower_quantile(np.array([0.25], np.float32), 0.05) == 0.25


def test_calibrated_threshold_keeps_the_asked_share_of_unseen_photos_drawn_like_the_training_photos():
    # Uniform scores: the share of unseen photos below a threshold t is t itself, so the mean threshold
    # over many draws of 100 calibration photos is the expected share rejected. torch.quantile's
    # default (position 1 + 99 * 0.05) rejects 0.059 of them on average instead of 0.05.
    generator = torch.Generator().manual_seed(0)
    rule = KnnRejection(1)
    rejected = []
    for _ in range(4000):
        rule.calibration = torch.rand(100, generator=generator).sort().values.numpy()
        rejected.append(rule.threshold_for(0.95))
    assert abs(sum(rejected) / len(rejected) - 0.05) < 0.002


def test_rule_score_is_cosine_to_the_nearest_bank_row():
    bank = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    rule = KnnRejection(2)
    rule.fit(bank, np.arange(2), keep=0.5)
    query = np.array([[3.0, 3.0], [1.0, 0.1], [-1.0, 0.0]], np.float32)
    expected = np.array([1 / math.sqrt(2), float(l2_normalise(query[1:2])[0, 0]), 0.0])
    assert np.allclose(rule.score(query), expected, atol=1e-6)


def test_unfitted_rule_rejects_nothing():
    rule = KnnRejection(4)
    assert not rule.fitted
    assert np.isinf(rule.score(np.ones((3, 4), np.float32))).all() and rule.threshold_for(0.5) == -math.inf


def _gaussian_classes(generator, num_classes=3, per_class=30, dim=24):
    """Photos of ``num_classes`` Gaussian classes (non-negative, like post-ReLU features) and a
    sampler of more photos of the same classes or of a class the rule never saw."""
    centres = torch.randn(num_classes + 1, dim, generator=generator) * 1.5 + 6.0
    spread = torch.rand(dim, generator=generator) * 1.5 + 0.2  # anisotropic: Mahalanobis differs from cosine

    def draw(label_list):
        labels = torch.tensor(label_list)
        return (centres[labels] + torch.randn(len(labels), dim, generator=generator) * spread).relu().numpy(), labels.numpy()

    features, labels = draw([c for c in range(num_classes) for _ in range(per_class)])
    return features, labels, draw


def test_relative_mahalanobis_score_matches_the_full_shrunk_covariance_formula():
    generator = torch.Generator().manual_seed(5)
    features, labels, draw = _gaussian_classes(generator)
    rule = RelativeMahalanobisRejection(features.shape[1])
    summary = rule.fit(features, np.arange(len(labels)), keep=0.9, labels=labels)
    assert summary["score"] == "rmd" and summary["calibration_photos"] == len(labels)
    queries, _ = draw([0, 1, 2, 3] * 5)

    z, zq = torch.from_numpy(rule.embed(features)), torch.from_numpy(rule.embed(queries))
    labels = torch.from_numpy(labels)
    s = rule.SHRINKAGE

    def precision(residuals):
        covariance = residuals.T @ residuals / len(residuals)
        return torch.linalg.inv((1 - s) * covariance + s * covariance.diagonal().mean() * torch.eye(z.shape[1]))

    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    within, background = precision(z - means[labels]), precision(z - z.mean(0))
    per_class = torch.stack([((zq - m) @ within * (zq - m)).sum(1) for m in means], 1)
    to_all = ((zq - z.mean(0)) @ background * (zq - z.mean(0))).sum(1)
    expected = -(per_class - to_all[:, None]).min(1).values
    assert np.allclose(rule.score(queries), expected.numpy(), rtol=1e-3, atol=1e-2)


def test_relative_mahalanobis_calibration_keeps_the_asked_share_of_unseen_photos_and_rejects_an_unseen_class():
    generator = torch.Generator().manual_seed(6)
    features, labels, draw = _gaussian_classes(generator)
    rule = rule_for_labels(features.shape[1], labels)
    assert isinstance(rule, RelativeMahalanobisRejection)
    rule.fit(features, np.arange(len(labels)), keep=0.9, labels=labels)
    known, _ = draw([c for c in range(3) for _ in range(1000)])
    unseen_class, _ = draw([3] * 300)
    kept = float((rule.score(known) >= rule.threshold).mean())
    assert 0.85 <= kept <= 0.95, kept
    assert float((rule.score(unseen_class) < rule.threshold).mean()) > 0.9


def test_rule_falls_back_to_knn_below_the_photos_per_class_the_mahalanobis_rule_needs():
    features, labels, _ = _blobs(per_class=RelativeMahalanobisRejection.MIN_PHOTOS)
    assert isinstance(rule_for_labels(features.shape[1], labels), RelativeMahalanobisRejection)
    few = labels.copy()
    few[0] = 1  # class 0 now has one photo fewer than the minimum
    assert isinstance(rule_for_labels(features.shape[1], few), KnnRejection)
    assert isinstance(rule_for_labels(features.shape[1], None), KnnRejection)
    head = build_head("prototype", features.shape[1], 3)
    head.fit(features, few)
    assert head.fit_rejection(features, np.arange(len(few)), 0.9, labels=few)["score"] == "knn"


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_state_round_trips_the_mahalanobis_rule(kind):
    features, labels, others = _blobs()
    head = build_head(kind, features.shape[1], 3)
    head.fit(features, labels, **({"weight_decay": 1e-2} if kind == "linear" else {}))
    assert head.fit_rejection(features, np.arange(len(labels)), keep=0.8, labels=labels)["score"] == "rmd"
    loaded = head_from_state(kind, features.shape[1], 3, head.state())  # strict
    assert isinstance(loaded.rejection, RelativeMahalanobisRejection) and loaded.rejection.fitted
    assert np.array_equal(loaded.known_score(others), head.known_score(others))
    assert loaded.rejection.threshold_for(0.7) == head.rejection.threshold_for(0.7)
    # A head fitted with the kNN rule (an archive made before the Mahalanobis rule) still loads as kNN.
    head.fit_rejection(features, np.arange(len(labels)), keep=0.8)
    loaded.load_state(head.state())
    assert isinstance(loaded.rejection, KnnRejection) and np.array_equal(loaded.known_score(others), head.known_score(others))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_state_round_trips_its_rule_and_loads_archives_made_before_rules(kind):
    features, labels, others = _blobs()
    head = build_head(kind, features.shape[1], 3)
    head.fit(features, labels, power=0.5, **({"weight_decay": 1e-2} if kind == "linear" else {}))
    head.fit_rejection(features, np.arange(len(labels)), keep=0.8)
    state = head.state()

    loaded = head_from_state(kind, features.shape[1], 3, state)  # strict: the bank's size comes from the state
    assert loaded.rejection.fitted and float(loaded.power) == 0.5
    assert np.array_equal(loaded.known_score(others), head.known_score(others))
    assert np.array_equal(loaded(others), head(others))
    assert loaded.rejection.threshold_for(0.7) == head.rejection.threshold_for(0.7)

    old = {k: v for k, v in state.items() if not k.startswith("rejection.") and k != "power"}
    legacy = head_from_state(kind, features.shape[1], 3, old)
    assert not legacy.rejection.fitted and float(legacy.power) == 1.0


def test_a_state_of_another_head_is_refused():
    features, labels, _ = _blobs()
    head = build_head("prototype", features.shape[1], 3)
    head.fit(features, labels)
    state = head.state()
    with pytest.raises(ValueError, match="lacks 'linear.weight'"):
        head_from_state("linear", features.shape[1], 3, state)
    with pytest.raises(ValueError, match="shape"):
        head_from_state("prototype", features.shape[1], 4, state)
    with pytest.raises(ValueError, match="unexpected"):
        head_from_state("prototype", features.shape[1], 3, {**state, "linear.weight": np.zeros((3, 3), np.float32)})


def test_power_transform_is_sign_preserving_and_applied_before_centring():
    head = build_head("prototype", 3, 2)
    features = np.array([[4.0, -9.0, 0.0], [16.0, 1.0, 1.0]], np.float32)
    head.fit(features, np.array([0, 1]), power=0.5)
    rooted = np.array([[2.0, -3.0, 0.0], [4.0, 1.0, 1.0]], np.float32)
    assert np.allclose(head.center, rooted.mean(0))
    assert np.allclose(head.normalise(features), l2_normalise(rooted - rooted.mean(0)))


def test_auroc_matches_pairwise_counting_with_ties():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    generator = np.random.default_rng(1)
    known = generator.integers(0, 10, 37).astype(np.float32)
    unknown = generator.integers(0, 10, 23).astype(np.float32)
    diff = known[:, None] - unknown[None, :]
    pairwise = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
    assert abs(auroc(known, unknown) - pairwise) < 1e-6


def test_fpr_at_95_counts_unknowns_above_the_threshold_keeping_95_percent_of_knowns():
    known = np.arange(100, dtype=np.float32)  # the threshold keeping 95 of them is 4.95
    unknown = np.array([0.0, 4.0, 5.0, 50.0], np.float32)
    assert fpr_at_keep(known, unknown, 0.95) == 0.5


def test_openset_confusion_has_an_unknown_column_and_row():
    predicted = np.array([0, 1, 1, 0])
    rejected = np.array([False, False, True, False])
    labels = np.array([0, 1, 1, 1])
    assert openset_confusion(predicted, rejected, labels, 2) == [[1, 0, 0], [1, 1, 1]]
    full = openset_confusion(predicted, rejected, labels, 2, np.array([0, 1, 1]), np.array([True, True, False]))
    assert full[2] == [0, 1, 2]


def test_stratified_folds_cover_every_photo_once_with_every_class_in_every_fold():
    labels = np.array([0] * 5 + [1] * 7 + [2] * 4)
    folds = stratified_folds(labels, 4, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for fold in folds:
        assert set(labels[fold].tolist()) == {0, 1, 2}


def test_auto_chooses_from_the_candidates_by_cross_validation_and_falls_back_at_one_shot():
    features, labels, _ = _blobs()
    choice, report = choose_head(features, None, labels, 3, space=FAST_SPACE)
    assert choice in FAST_SPACE
    assert report["folds"] == 4 and len(report["cross_validated"]) == len(FAST_SPACE)
    assert {c.kind for c in candidates(has_views=True)} == {"linear", "prototype", "ensemble"}
    assert all(c.views for c in candidates(has_views=True) if c.kind in ("linear", "ensemble"))
    assert report["chosen_score"]["accuracy"] == max(s["accuracy"] for s in report["cross_validated"].values()) or \
        report["chosen_score"]["accuracy"] >= max(s["accuracy"] for s in report["cross_validated"].values()) - 0.005
    one_shot, report = choose_head(features[::20], None, labels[::20], 3)
    assert one_shot == Candidate("linear") and "single training photo" in report["reason"]


def test_auto_prefers_the_linear_head_where_only_a_learned_boundary_separates_the_classes():
    # One weak discriminative direction under loud nuisance directions: distances to class means are
    # dominated by the nuisance, a linear boundary learns to ignore it.
    generator = torch.Generator().manual_seed(3)
    n, dim = 40, 16
    labels = torch.arange(2).repeat_interleave(n)
    features = torch.randn(2 * n, dim, generator=generator) * 3.0
    features[:, 0] = torch.where(labels == 0, 1.0, -1.0) + 0.2 * torch.randn(2 * n, generator=generator)
    choice, report = choose_head((features + 5.0).numpy(), None, labels.numpy(), 2, space=FAST_SPACE)
    assert choice.kind == "linear", report["cross_validated"]
    prototype_best = max(v["accuracy"] for k, v in report["cross_validated"].items() if k.startswith("prototype"))
    assert report["chosen_score"]["accuracy"] >= prototype_best + 0.05


def test_keep_1_summary_is_strict_json():
    import json

    features, labels, _ = _blobs()
    summary = KnnRejection(features.shape[1]).fit(features, np.arange(len(labels)), keep=1.0)
    assert summary["threshold"] is None
    json.dumps(summary, allow_nan=False)
