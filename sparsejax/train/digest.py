"""Content digests of checkpoint directories: written after the data, verified before a read.

A digest lists every file under a checkpoint directory with its size and SHA-256. It is written
last, once the checkpoint is complete, so a directory without one was never finished; a file
whose bytes, size or presence differ from the digest means the checkpoint was damaged after it
was written (a bit flip, a truncation, a deleted metadata file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DIGEST_FILE = "sparsejax_digest.json"
UNFINISHED = "it has no digest: its save did not finish"
"""The verdict on a checkpoint whose digest was never written."""
HASH = "sha256"
CHUNK_BYTES = 1 << 22


def file_hash(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 4 MiB chunks (``hashlib`` releases the GIL on
    each, so hashing overlaps with work in other threads)."""
    digest = hashlib.new(HASH)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sealed_files(directory: Path) -> list[Path]:
    """The files under ``directory`` that a digest covers: all but the digest's own."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and not path.name.startswith(DIGEST_FILE)
    )


def directory_digest(directory: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of :func:`sealed_files`."""
    return {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, HASH: file_hash(path)}
        for path in sealed_files(directory)
    }


def write_digest(directory: Path) -> None:
    """Hash ``directory`` and write its digest file atomically inside it."""
    text = json.dumps({"files": directory_digest(directory)}, indent=1, sort_keys=True)
    partial = directory / f"{DIGEST_FILE}.partial"
    partial.write_text(text)
    partial.replace(directory / DIGEST_FILE)


def verify_digest(directory: Path) -> str | None:
    """None when ``directory`` matches its digest; else why not, in a few words."""
    path = directory / DIGEST_FILE
    if not path.is_file():
        return UNFINISHED
    try:
        expected = json.loads(path.read_text())["files"]
        if not all(isinstance(entry, dict) for entry in expected.values()):
            raise TypeError("an entry is not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its digest file is unreadable ({error})"
    found = {path.relative_to(directory).as_posix() for path in sealed_files(directory)}
    missing, added = sorted(set(expected) - found), sorted(found - set(expected))
    if missing:
        return f"{missing[0]} is missing"
    if added:
        return f"{added[0]} was not part of it when it was saved"
    for name, entry in sorted(expected.items()):
        file = directory / name
        size = file.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, {entry.get('bytes')} were saved"
        if file_hash(file) != entry.get(HASH):
            return f"the content of {name} differs from what was saved"
    return None
