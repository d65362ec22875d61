"""Shared fixtures: real archives, real TorchServe processes on free loopback ports.

Archives are built once per test session. A TorchServe started by ``torchserve_factory`` gets its
own model store, working directory and TMPDIR, and is stopped (with all its workers) afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from handlers.backbones import get_backbone, imagenet_categories
from imagerec.archive import build_archive
from imagerec.export import CACHE_DIR_VAR
from imagerec.paths import DATASETS_DIR as DATASETS
from imagerec.paths import SAMPLES_DIR as SAMPLES
from imagerec.torchserve import TorchServe, install_archive

logging.getLogger("PIL").setLevel(logging.INFO)
UNIT_DIR = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/unit is the fast tier (``pytest -m unit``): no Java, no TorchServe, no ../shared."""
    for item in items:
        if UNIT_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """Exported backbone graphs go to a cache of this session (and of its subprocesses), never the user's."""
    path = tmp_path_factory.mktemp("onnx-cache")
    os.environ[CACHE_DIR_VAR] = str(path)
    return path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    assert SAMPLES.is_dir(), f"sample photos missing: expected {SAMPLES} (the shared/ folder beside the repo)"
    return SAMPLES


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    assert DATASETS.is_dir(), f"photo sets missing: expected {DATASETS} (the shared/ folder beside the repo)"
    return DATASETS


@pytest.fixture(scope="session")
def archive_dir(tmp_path_factory) -> Path:
    """Where the session's archives are built (not a model store: servers copy what they need)."""
    return tmp_path_factory.mktemp("built-archives")


@pytest.fixture(scope="session")
def efficientnet_archive(archive_dir) -> Path:
    """The genuinely ImageNet-pretrained backbone, as built by default: real features, sensible
    labels, the portable graph. No accuracy guard ran, so it serves fp32 everywhere."""
    backbone = get_backbone("efficientnet_lite0")
    return build_archive(
        name="efficientnet_lite0", version="1.0", backbone_name=backbone.name,
        weights_path=backbone.resolve_weights(), labels=imagenet_categories(), out_dir=archive_dir,
    )


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    """A ResNet-18 state_dict the test makes itself (genuine weights cannot be downloaded here), from
    torchvision's own architecture, as the genuine weights are."""
    import torchvision

    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18-selfmade.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def resnet18_archive(archive_dir, resnet18_weights) -> Path:
    return build_archive(
        name="resnet18", version="1.0", backbone_name="resnet18", weights_path=resnet18_weights,
        labels=imagenet_categories(), out_dir=archive_dir,
    )


@pytest.fixture
def torchserve_factory(tmp_path_factory):
    """start(archives, models=..., **TorchServe kwargs) -> a started TorchServe; all stopped at teardown."""
    servers: list[TorchServe] = []

    def start(archives=(), models: str | None = None, **kwargs) -> TorchServe:
        root = tmp_path_factory.mktemp("torchserve")
        store = root / "model-store"
        store.mkdir()
        for archive in archives:
            install_archive(archive, store)
        server = TorchServe(model_store=store, workdir=root / "work", models=models, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def empty_server_factory(tmp_path_factory):
    """For one test module: start() -> a TorchServe with an empty model store (tests register models)."""
    servers: list[TorchServe] = []

    def start() -> TorchServe:
        root = tmp_path_factory.mktemp("module-server")
        server = TorchServe(model_store=root / "model-store", workdir=root / "work")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def imagenet_server(tmp_path_factory, efficientnet_archive, resnet18_archive):
    """One TorchServe for the session serving both backbone archives (names as in their manifests)."""
    root = tmp_path_factory.mktemp("imagenet-server")
    store = root / "model-store"
    store.mkdir()
    for archive in (efficientnet_archive, resnet18_archive):
        install_archive(archive, store)
    models = f"efficientnet_lite0={efficientnet_archive.name},resnet18={resnet18_archive.name}"
    server = TorchServe(model_store=store, workdir=root / "work", models=models)
    server.start()
    yield server
    server.stop()
