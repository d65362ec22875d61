"""Reliability under misuse and at the edges (issue 9): archive builds that touch nothing outside their
output, thin-image bombs, bad names in a snapshot, stops that answer every accepted request."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from handlers.archive import build_archive
from handlers.backbones import imagenet_categories
from scripts.ts_runtime import PROJECT_ROOT

BUILD = [sys.executable, str(PROJECT_ROOT / "scripts" / "build_archive.py")]


# -- 1. archive builds touch nothing outside their output folder ------------------------------------
def test_a_build_leaves_a_folder_named_like_the_model_in_the_temp_dir_alone(resnet18_weights, tmp_path, monkeypatch):
    """torch-model-archiver empties and deletes $TMPDIR/<model name>: it must never see the user's TMPDIR."""
    temp = tmp_path / "tmp"
    precious = temp / "nc"
    precious.mkdir(parents=True)
    (precious / "thesis.txt").write_text("four years of work")
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the cached temp dir: use $TMPDIR as a user would

    build_archive(name="nc", version="1", backbone_name="resnet18", weights_path=resnet18_weights,
                  labels=imagenet_categories(), out_dir=tmp_path / "out")

    assert (precious / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in temp.iterdir()) == ["nc"], "the build left something in the temp dir"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["nc_v1.mar"]


def test_two_concurrent_builds_with_the_same_name_both_succeed(resnet18_weights, tmp_path):
    """Two processes, one TMPDIR, the same model name and weights: neither deletes the other's files."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    builds = [
        subprocess.Popen(BUILD + ["--backbone", "resnet18", "--weights", str(resnet18_weights), "--name", "same",
                                  "--version", "1", "--compile", "none", "--out", str(tmp_path / f"out{i}")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outcomes = [build.communicate(timeout=300) for build in builds]
    for build, (stdout, stderr) in zip(builds, outcomes):
        assert build.returncode == 0, stderr
    for i in range(2):
        assert (tmp_path / f"out{i}" / "same_v1.mar").is_file()
    assert list(temp.iterdir()) == []
