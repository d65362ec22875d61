"""Heads and their evaluation on synthetic features: the math alone, no photos, no server.

The heads are numpy; torch appears here only as the reference they replaced (the same functions
and the same held-out draws as torch's) and, seeded, to draw the synthetic features."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handlers.arrays import cross_entropy, l2_normalise, log_softmax, softmax
from handlers.heads import HEADS, LinearHead, RowSpace, _holdout_mask, _torch_randperm, build_head, head_from_state
from handlers.layout import LEGACY_HEAD_FILE
from handlers.recognizer import read_head_state
from training.data import normalised_class_name
from training.evaluation import draw_confusion, evaluate, mean_ci95


def _blobs(num_classes=3, per_class=12, dim=32, centre_seed=0, noise_seed=0):
    """Separable clusters around random centres plus a large shared offset (like ImageNet features).
    The same ``centre_seed`` with another ``noise_seed`` is a fresh draw of the same classes.
    (N, D) float32 features, (N,) int64 labels."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(centre_seed)) * 2
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(1000 + noise_seed))
    return (centres[labels] + noise + 10.0).numpy(), labels.numpy()


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
    assert head(features).shape == (len(labels), 3) and head(features).dtype == np.float32
    fresh, fresh_labels = _blobs(noise_seed=1)  # same classes, new samples
    assert (head(fresh).argmax(1) == fresh_labels).mean() >= 0.9
    copy = head_from_state(kind, features.shape[1], 3, head.state())
    assert np.array_equal(copy(fresh), head(fresh))


def test_unknown_head_and_fit_options_are_refused():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("nearest", 8, 2)
    features, labels = _blobs()
    with pytest.raises(TypeError):
        build_head("prototype", features.shape[1], 3).fit(features, labels, weight_decai=0.1)


def test_linear_head_keeps_augmented_views_of_one_image_together():
    """Held-out rows are whole images: views of a held-out image never leak into its training."""
    labels = np.repeat(np.arange(4), 10)
    groups = np.repeat(np.arange(40), 3)
    held = _holdout_mask(np.repeat(labels, 3), groups, 0.25, seed=1)
    for group in np.unique(groups):
        assert held[groups == group].all() or not held[groups == group].any()
    assert 0 < held.mean() < 0.5


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_held_out_images_are_the_ones_the_torch_head_held_out(seed):
    """torch.randperm's shuffle on torch's generator, reproduced: the same seed holds out the same
    images (so the chosen weight decay, and the archive, did not move with the port to numpy)."""
    generator = torch.Generator().manual_seed(seed)
    stream = np.random.RandomState(seed)
    for n in (1, 2, 5, 13, 20, 100):  # successive draws continue one stream, as in the head
        assert _torch_randperm(n, stream).tolist() == torch.randperm(n, generator=generator).tolist()


def test_array_functions_compute_what_torch_functional_does():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(17, 5, generator=generator) * 4
    labels = torch.randint(0, 5, (17,), generator=generator)
    weight = torch.rand(5, generator=generator) + 0.5
    rows = torch.randn(17, 9, generator=generator)
    rows[3] = 0  # a zero row stays zero (no 0/0)
    assert np.allclose(l2_normalise(rows.numpy()), F.normalize(rows, dim=1).numpy(), atol=1e-7)
    assert np.allclose(log_softmax(logits.numpy()), logits.log_softmax(1).numpy(), atol=1e-6)
    assert np.allclose(softmax(logits.numpy()), logits.softmax(1).numpy(), atol=1e-7)
    assert cross_entropy(logits.numpy(), labels.numpy()) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert cross_entropy(logits.numpy(), labels.numpy(), weight.numpy()) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=weight)), rel=1e-6)
    assert cross_entropy(logits.numpy(), labels.numpy(), reduction="sum") == pytest.approx(
        float(F.cross_entropy(logits, labels, reduction="sum")), rel=1e-6)


def test_linear_head_with_one_image_per_class_still_fits():
    features, labels = _blobs(per_class=1)
    head = build_head("linear", features.shape[1], 3)
    summary = head.fit(features, labels)
    assert summary["weight_decay"] > 0
    assert (head(features).argmax(1) == labels).all()


def test_evaluation_metrics_and_confusion_png(tmp_path):
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 1, 1])
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
    views = features + torch.randn(features.shape, generator=torch.Generator().manual_seed(7)).numpy() * 3.0
    rows, row_labels = np.concatenate([features, views]), np.concatenate([labels, labels])
    groups = np.concatenate([np.arange(len(labels))] * 2)
    head = build_head("ensemble", features.shape[1], 3)
    head.fit(rows, row_labels, groups=groups, power=0.5, weight_decay=1e-2)
    members = head.members
    fresh, _ = _blobs(noise_seed=2)
    expected = (softmax(members["linear"](fresh)) + softmax(members["prototype"](fresh))) / 2
    assert np.allclose(softmax(head(fresh)), expected, atol=1e-6)
    alone = build_head("prototype", features.shape[1], 3)
    alone.fit(features, labels, power=0.5)
    assert np.allclose(members["prototype"].prototypes, alone.prototypes, atol=1e-6)
    assert float(head.power) == 0.5 and members["linear"].power == 0.5


LEGACY_HEADS = Path(__file__).resolve().parents[1] / "data" / "legacy_heads"  # its README says how they were made


def write_legacy_head_pt(name: str, path: Path) -> None:
    """``head.pt`` as the torch heads wrote it: torch.save of their state_dict, whose names, order and
    numbers the old code produced (kept as arrays in legacy_states.npz: the repository holds no model
    files, so the file itself is written here, the way the old code wrote it)."""
    prefix = f"{name}/"
    with np.load(LEGACY_HEADS / "legacy_states.npz", allow_pickle=False) as saved:
        state = OrderedDict((key[len(prefix):], torch.from_numpy(saved[key])) for key in saved.files
                            if key.startswith(prefix))
    torch.save(state, path)


@pytest.mark.parametrize("name", ["prototype", "linear", "ensemble", "linear-knn"])
def test_a_head_pt_of_an_archive_made_before_the_numpy_heads_answers_as_it_did(name, tmp_path):
    """The torch state_dict (head.pt) the torch heads wrote, read as the worker reads an older
    archive: the same logits, rejection scores and thresholds as the torch head computed."""
    expected = np.load(LEGACY_HEADS / "expected.npz")
    write_legacy_head_pt(name, tmp_path / LEGACY_HEAD_FILE)
    state = read_head_state(tmp_path)
    kind = name.split("-")[0]
    head = head_from_state(kind, 16, 3, state)
    queries = expected["queries"]
    assert np.allclose(head(queries), expected[f"{name}.logits"], rtol=1e-5, atol=1e-5)
    assert np.allclose(head.known_score(queries), expected[f"{name}.scores"], rtol=1e-5, atol=1e-5)
    assert head.rejection.kind == ("knn" if name.endswith("knn") else "rmd")
    assert float(head.rejection.threshold) == float(expected[f"{name}.threshold"])
    assert head.rejection.threshold_for(0.5) == float(expected[f"{name}.threshold_0.5"])
    # A head fitted now saves the same names (head.npz), so both kinds of file describe one state.
    fresh = build_head(kind, 16, 3)
    fresh.fit(expected["features"], expected["labels"], **({"weight_decay": 1e-2} if kind == "linear" else {}))
    fresh.fit_rejection(expected["features"], np.arange(len(expected["labels"])), 0.8,
                        labels=None if name.endswith("knn") else expected["labels"])
    assert set(fresh.state()) == set(state)


def test_head_fits_run_numpys_blas_on_one_thread_and_give_the_threads_back():
    from training.blas import blas_threads, single_thread

    before = blas_threads()
    assert before is not None  # numpy's wheels bundle OpenBLAS: the switch must find it here
    with single_thread():
        assert blas_threads() == 1
    assert blas_threads() == before


def test_the_linear_head_solves_in_the_rows_span_when_rows_are_fewer_than_dimensions():
    """Fewer rows than dimensions (100 photos of 1280-2560-d features): RowSpace is an isometry of
    the rows' span, and the solution found there is the full-space one (same probabilities within
    the solver's tolerance). Dropped directions carry no data: duplicated rows lose no accuracy."""
    features, labels = _blobs(num_classes=4, per_class=10, dim=300)
    features = np.concatenate([features, features[:5]])  # 45 rows, 40 different ones
    labels = np.concatenate([labels, labels[:5]])
    head = LinearHead(features.shape[1], 4)
    x = head.fit_normalisation(features, 0.5)
    space = RowSpace(x)
    rank = np.linalg.matrix_rank(x)  # 39: centring takes one more direction
    assert rank < 40 and space.coordinates.shape == (len(x), rank)
    np.testing.assert_allclose(space.coordinates @ space.coordinates.T, x @ x.T, atol=1e-5)
    coefficients = np.random.default_rng(0).standard_normal((4, rank)).astype(np.float32)
    np.testing.assert_allclose(x @ space.weight(coefficients).T, space.coordinates @ coefficients.T, atol=1e-4)

    class FullSpace(RowSpace):  # the rows as they are: what _solve did before RowSpace
        def __init__(self, rows):
            super().__init__(np.zeros((1, 1), np.float32))
            self.coordinates = rows

    test_features, _ = _blobs(num_classes=4, per_class=10, dim=300, noise_seed=1)
    test_x = head.normalise(test_features)
    for weight_decay in (1e-3, 1e-2):
        reduced = head._solve(x, labels, weight_decay, max_iter=200)
        full = head._solve(x, labels, weight_decay, max_iter=200, space=FullSpace(x))
        assert reduced[0].shape == full[0].shape == (4, 300)
        np.testing.assert_allclose(softmax(test_x @ reduced[0].T + reduced[1]),
                                   softmax(test_x @ full[0].T + full[1]), atol=1e-3)
