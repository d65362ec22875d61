"""Receiving a teaching set from the page: photos per class, or one .zip with a folder per class.

The upload is streamed to disk (never held whole in memory) under limits on the size of each photo,
the total and the number of files; a .zip is unpacked only when none of its entries would land
outside the set's folder. Then every photo is decoded (``handlers.imaging.decode_image``, the
served model's own decoder) and the class names are checked with training's own rules, so a set
that reaches ``train_head.py`` is one it accepts.

Form fields (multipart/form-data, in this order per class): ``name`` (the mode's name),
``class-<i>`` (the i-th class's name) and ``photos-<i>`` (its photos, repeated), and/or ``zip``
(one .zip: ``<class>/<photo>``, optionally all inside one top folder). ``backbone`` (optional; the
page sends it first, so a refused one stops the upload before any photo) names the backbone the
mode is trained on, one of those the page offers; without it, the first of them.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from handlers.constants import MAX_REQUEST_BYTES
from imagerec.naming import validate_name

logger = logging.getLogger(__name__)

MAX_PHOTO_BYTES = MAX_REQUEST_BYTES  # a photo: 20 MB, as the recognition API accepts
MAX_SET_BYTES = 200 * 1024 * 1024  # a whole teaching set, uploaded or unpacked from a zip
MAX_SET_FILES = 2000
MIN_PHOTOS_PER_CLASS = 2  # one to learn from and one to check it on
MAX_CLASSES = 100
CLASS_NAME_MAX = 64
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
_CHUNK = 1 << 16


class TeachingSetError(ValueError):
    """The upload cannot become a teaching set; ``code`` names the problem for the page, ``status``
    is the HTTP answer."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class TeachingSet:
    name: str = ""
    backbone: str = ""
    root: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0
    files: int = 0


def validate_class_name(name: str) -> str:
    """A class name is a folder name and a label: printable, no path separators, at most 64 chars."""
    cleaned = unicodedata.normalize("NFC", (name or "").strip())
    if not cleaned or len(cleaned) > CLASS_NAME_MAX:
        raise TeachingSetError("bad_class", f"class name {name!r} must be 1 to {CLASS_NAME_MAX} characters")
    if cleaned.startswith(".") or re.search(r"[/\\\x00-\x1f\x7f]", cleaned):
        raise TeachingSetError("bad_class", f"class name {name!r} may not start with '.' or contain '/', '\\' "
                                            "or control characters")
    return cleaned


def check_backbone(name: str, backbones: list[str]) -> str:
    """``name`` if the page offers it; else a TeachingSetError naming the ones it does."""
    if name not in backbones:
        raise TeachingSetError("bad_backbone", f"backbone {name!r} is not offered here; choose from "
                                               f"{', '.join(backbones)}")
    return name


class _Writer:
    """Writes uploaded files into ``root/<class>/`` and enforces the size and count limits."""

    def __init__(self, teaching_set: TeachingSet):
        self.set = teaching_set

    def target(self, class_name: str, original_name: str) -> Path:
        if self.set.files >= MAX_SET_FILES:
            raise TeachingSetError("too_many", f"a teaching set holds at most {MAX_SET_FILES} photos", 413)
        suffix = PurePosixPath(original_name or "").suffix.lower()
        folder = self.set.root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        self.set.files += 1
        self.set.counts[class_name] = self.set.counts.get(class_name, 0) + 1
        # Our own file names: the user's name never reaches the file system.
        return folder / f"{self.set.counts[class_name]:04d}{suffix if suffix in PHOTO_SUFFIXES else '.img'}"

    def count(self, size: int, what: str) -> None:
        self.set.total_bytes += size
        if self.set.total_bytes > MAX_SET_BYTES:
            raise TeachingSetError("set_too_large", f"the teaching set exceeds {MAX_SET_BYTES // 2**20} MB "
                                                    f"(at {what})", 413)


async def receive(reader, root: Path, backbones: list[str]) -> TeachingSet:
    """Stream a multipart teaching-set upload (aiohttp MultipartReader) into ``root``; ``backbones``
    are the ones the mode may be trained on, the first the default."""
    teaching_set = TeachingSet(root=root, backbone=backbones[0])
    writer = _Writer(teaching_set)
    class_names: dict[str, str] = {}
    root.mkdir(parents=True)
    zips: list[Path] = []
    for _ in range(MAX_SET_FILES + 2 * MAX_CLASSES + 10):  # bounded: every part is a field or a file
        part = await reader.next()
        if part is None:
            break
        field_name = part.name or ""
        if field_name == "name":
            teaching_set.name = (await part.text()).strip()
        elif field_name == "backbone":
            teaching_set.backbone = check_backbone((await part.text()).strip(), backbones)
        elif field_name.startswith("class-"):
            if len(class_names) >= MAX_CLASSES:
                raise TeachingSetError("too_many_classes", f"at most {MAX_CLASSES} classes")
            class_names[field_name[len("class-"):]] = validate_class_name(await part.text())
        elif field_name.startswith("photos-"):
            index = field_name[len("photos-"):]
            if index not in class_names:
                raise TeachingSetError("bad_form", f"photos for class {index} came before its name")
            await _save_part(part, writer.target(class_names[index], part.filename), writer)
        elif field_name == "zip":
            path = root.with_name(root.name + f"-upload-{len(zips)}.zip")
            zips.append(path)
            await _save_part(part, path, writer, limit=MAX_SET_BYTES)
        else:
            raise TeachingSetError("bad_form", f"unexpected form field {field_name!r}")
    else:
        raise TeachingSetError("too_many", "too many form fields")
    try:
        for path in zips:
            unpack_zip(path, writer)
    finally:
        for path in zips:
            path.unlink(missing_ok=True)
    return teaching_set


async def _save_part(part, target: Path, writer: _Writer, limit: int = MAX_PHOTO_BYTES) -> None:
    size = 0
    with open(target, "wb") as f:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise TeachingSetError("too_large", f"{part.filename or 'a file'} is larger than "
                                                    f"{limit // 2**20} MB", 413)
            writer.count(len(chunk), part.filename or "a file")
            f.write(chunk)


def unpack_zip(path: Path, writer: _Writer) -> None:
    """Unpack ``<class>/<photo>`` entries (optionally under one top folder) into the set.

    Refused, before anything is written: entries that are absolute, climb out with '..', are links,
    or sit deeper than class/photo; more files or more bytes (as the zip declares them) than the
    limits. Bytes actually unpacked are counted too, so a lying header cannot exceed the limit.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TeachingSetError("bad_zip", f"the .zip cannot be read: {exc}") from None
    with archive:
        entries = []
        for info in archive.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise TeachingSetError("bad_zip", f"zip entry {info.filename!r} points outside its folder")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise TeachingSetError("bad_zip", f"zip entry {info.filename!r} is a link")
            if info.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue  # folders, macOS resource forks, hidden files
            entries.append((parts, info))
        if not entries:
            raise TeachingSetError("bad_zip", "the .zip holds no photos")
        tops = {parts[0] for parts, _ in entries}
        if len(tops) == 1 and all(len(parts) == 3 for parts, _ in entries):
            entries = [(parts[1:], info) for parts, info in entries]  # one wrapping folder
        declared = sum(info.file_size for _, info in entries)
        if len(entries) + writer.set.files > MAX_SET_FILES or declared + writer.set.total_bytes > MAX_SET_BYTES:
            raise TeachingSetError("set_too_large", f"the .zip unpacks to {len(entries)} files, "
                                                    f"{declared / 2**20:.0f} MB: the limit is {MAX_SET_FILES} "
                                                    f"files, {MAX_SET_BYTES // 2**20} MB", 413)
        for parts, info in entries:
            if len(parts) != 2:
                raise TeachingSetError("bad_zip", f"zip entry {info.filename!r} is not <class folder>/<photo>")
            if info.file_size > MAX_PHOTO_BYTES:
                raise TeachingSetError("too_large", f"{info.filename} is larger than "
                                                    f"{MAX_PHOTO_BYTES // 2**20} MB", 413)
            target = writer.target(validate_class_name(parts[0]), parts[1])
            size = 0
            with archive.open(info) as source, open(target, "wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > MAX_PHOTO_BYTES:
                        raise TeachingSetError("too_large", f"{info.filename} is larger than declared", 413)
                    writer.count(len(chunk), info.filename)
                    out.write(chunk)


def check_set(teaching_set: TeachingSet) -> None:
    """Names and content, after the upload: raises TeachingSetError naming the first problem.

    Decoding (``handlers.imaging``: Pillow) happens here, in a worker thread of the page server,
    only when someone teaches.
    """
    from handlers.imaging import ImageError, decode_image
    from training.data import DataError, check_class_names

    try:
        validate_name(teaching_set.name)
    except ValueError as exc:
        raise TeachingSetError("bad_name", str(exc)) from None
    try:
        check_class_names(sorted(teaching_set.counts), teaching_set.root)
    except DataError as exc:
        raise TeachingSetError("bad_classes", str(exc).replace(str(teaching_set.root), "the set")) from None
    few = {name: n for name, n in teaching_set.counts.items() if n < MIN_PHOTOS_PER_CLASS}
    if few:
        raise TeachingSetError("too_few", f"each class needs at least {MIN_PHOTOS_PER_CLASS} photos: "
                                          + ", ".join(f"{k} has {v}" for k, v in sorted(few.items())))
    for folder in sorted(p for p in teaching_set.root.iterdir() if p.is_dir()):
        for index, photo in enumerate(sorted(folder.iterdir()), 1):
            try:
                decode_image(photo.read_bytes(), min_side=32)
            except ImageError as exc:
                raise TeachingSetError("not_image", f"photo {index} of class {folder.name!r} is not a readable "
                                                    f"image ({exc})", 415) from None


def discard(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
