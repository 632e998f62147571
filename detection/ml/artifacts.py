"""Model and baseline artifacts: a JSON header line (FORMAT_VERSION, kind, SHA-256 of the payload)
followed by a pickle payload, written atomically (``.part`` then rename).

Pickle is only ever read back from files Vigil wrote itself; the checksum catches truncation and
tampering by accident, not by an attacker with write access to the artifact folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

FORMAT_VERSION = 1


class ArtifactError(Exception):
    """The artifact is missing, truncated, of another format version, or fails its checksum."""


def save_artifact(obj, path: Path | str, *, kind: str) -> str:
    """Write `obj` to `path` atomically. Returns the payload's SHA-256 hex digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    checksum = hashlib.sha256(payload).hexdigest()
    header = json.dumps({"format_version": FORMAT_VERSION, "kind": kind, "sha256": checksum}).encode() + b"\n"
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as fh:
        fh.write(header)
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    return checksum


def load_artifact(path: Path | str, *, kind: str, checksum: str | None = None):
    """Read an artifact written by save_artifact. Raises ArtifactError on any mismatch, and when the file
    is missing or cannot be read."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.readline())
            payload = fh.read()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist") from None
    except OSError as exc:  # a directory, no permission, an unreadable disk
        raise ArtifactError(f"artifact {path} cannot be read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"artifact {path} has no valid header") from None
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact {path} has format version {header.get('format_version')}, "
                            f"this Vigil reads {FORMAT_VERSION}")
    if header.get("kind") != kind:
        raise ArtifactError(f"artifact {path} holds a {header.get('kind')!r}, not a {kind!r}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.get("sha256") or (checksum and digest != checksum):
        raise ArtifactError(f"artifact {path} fails its checksum (truncated or modified)")
    return pickle.loads(payload)
