"""Exit codes, atomic files, names and versions: the small shared pieces every entry point uses."""

from __future__ import annotations

import argparse
import logging
import zipfile

import pytest

from handlers.layout import MAR_MANIFEST_FILE, MODEL_INFO_FILE, ArchiveContents
from imagerec.cli import EXIT_BAD_ARGUMENTS, exit_code_for, run_command
from handlers.layout import file_sha256
from imagerec.files import atomic_write
from imagerec.management import EXIT_REFUSED, ManageError, version_key
from imagerec.naming import archive_file_name, validate_name, validate_version
from imagerec.torchserve import read_properties, write_properties

logger = logging.getLogger("test")


def test_exceptions_map_to_their_codes_and_unknown_ones_propagate(capsys):
    errors = {FileExistsError: 7, ValueError: EXIT_BAD_ARGUMENTS}
    assert exit_code_for(ManageError("no", EXIT_REFUSED), errors) == EXIT_REFUSED  # its own code first
    assert exit_code_for(FileExistsError("x"), errors) == 7
    assert exit_code_for(KeyError("x"), errors) is None

    def main(args):
        if args.fail == "value":
            raise ValueError("bad --thing")
        if args.fail == "bug":
            raise KeyError("a bug")
        return {"ok": True}

    def run(fail):
        return run_command(main, argparse.Namespace(fail=fail), errors, logger=logger, output=lambda r: "line")

    assert run(None) == 0 and capsys.readouterr().out == "line\n"
    assert run("value") == EXIT_BAD_ARGUMENTS and capsys.readouterr().out == ""
    with pytest.raises(KeyError):
        run("bug")


def test_atomic_write_leaves_the_old_file_and_no_partial_when_the_writer_fails(tmp_path):
    target = tmp_path / "store" / "model.mar"
    atomic_write(target, lambda partial: partial.write_bytes(b"v1"))

    def broken(partial):
        partial.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"v1"
    assert [p.name for p in target.parent.iterdir()] == ["model.mar"]
    assert file_sha256(target) == "3bfc269594ef649228e9a74bab00f042efc91d5acc6fbee31a382e80d42388fe"


def test_names_versions_and_their_natural_order():
    assert archive_file_name("clothes", "1.0") == "clothes_v1.0.mar"
    for bad in ("../evil", "a;touch x", "", "9lives", "x" * 65):
        with pytest.raises(ValueError):
            validate_name(bad)
    for bad in ("../1", "1..2", "", "-1"):
        with pytest.raises(ValueError):
            validate_version(bad)
    assert sorted(["10", "9", "2-r1", "2", "1.10", "1.9"], key=version_key) == ["1.9", "1.10", "2", "2-r1", "9", "10"]


def test_properties_round_trip_with_java_escapes(tmp_path):
    path = write_properties(tmp_path / "a.properties", {"model_store": "/srv/models", "load_models": "a=b.mar"})
    assert read_properties(path) == {"model_store": "/srv/models", "load_models": "a=b.mar"}
    (tmp_path / "s.cfg").write_text('# snapshot\nmodel_snapshot={"a"\\:1, "b"\\: "\\u00e9"}\n')
    assert read_properties(tmp_path / "s.cfg")["model_snapshot"] == '{"a":1, "b": "é"}'


def test_archive_contents_read_from_a_zip_and_from_a_folder(tmp_path):
    mar = tmp_path / "m.mar"
    with zipfile.ZipFile(mar, "w") as zf:
        zf.writestr(MODEL_INFO_FILE, '{"name": "m", "version": "1"}')
        zf.writestr(MAR_MANIFEST_FILE, '{"model": {"modelName": "m", "modelVersion": "1"}}')
        zf.writestr("index_to_name.json", '{"0": "ants", "1": "bees"}')
    contents = ArchiveContents(mar)
    contents.verify()
    assert contents.info()["name"] == "m" and contents.labels() == ["ants", "bees"]
    unpacked = ArchiveContents(contents.extract_to(tmp_path / "unpacked"))
    assert unpacked.mar_manifest()["model"]["modelVersion"] == "1" and unpacked.labels() == ["ants", "bees"]
    with pytest.raises(ValueError, match="cannot read"):
        unpacked.read_bytes("head.pt")
    (tmp_path / "torn.mar").write_bytes(mar.read_bytes()[:-40])
    with pytest.raises(ValueError):
        ArchiveContents(tmp_path / "torn.mar").verify()
