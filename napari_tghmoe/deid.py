"""Pseudonyms for de-identified exports: one secret key, the same patient -> the same pseudonym.

A de-identified DICOM SR must still be a file a PACS can take: it needs a Patient ID, a
Patient's Name and a Study Instance UID, and two reports about one patient should land on
one (pseudonymous) patient. Every pseudonym here is a keyed hash (HMAC-SHA256) of the real
value under a secret that never leaves the workstation (or the project):

* the secret is a random 256-bit key in ``deid-secret`` in the user's config folder
  (``platformdirs``), created on first use with mode 0600; a team that wants the same
  pseudonyms on several machines points ``TGHMOE_DEID_SECRET`` at one shared secret file;
* without the secret nobody can confirm that a guessed patient ID or UID maps to a given
  pseudonym (a plain hash of a medical record number could be brute-forced in seconds);
* pseudonymous IDs carry 120 bits of the HMAC, so two patients share one only by a hash
  collision (probability below 1e-18 even among a billion patients);
* UIDs are remapped as ``2.25.<128-bit integer>`` (PS3.5 B.2), so a study keeps one
  pseudonymous Study Instance UID across exports, and images de-identified with the same
  key and :func:`pseudonymous_uid` would carry exactly the UIDs the report references.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming a project-level secret file (shared by a team).
SECRET_ENV = "TGHMOE_DEID_SECRET"
SECRET_FILE_NAME = "deid-secret"
#: Prefix of every pseudonymous Patient ID and family name (tells a reader it is not real).
PSEUDONYM_PREFIX = "ANON"
_MIN_SECRET_CHARS = 32  # 128 bits in hex


class DeidSecretError(RuntimeError):
    """The pseudonym secret file exists but cannot be used; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


def default_secret_path() -> Path:
    """``$TGHMOE_DEID_SECRET`` if set, else ``<user config dir>/napari-tghmoe/deid-secret``."""
    override = os.environ.get(SECRET_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_path

    return user_config_path("napari-tghmoe", appauthor=False) / SECRET_FILE_NAME


def load_or_create_secret(path: str | Path | None = None) -> bytes:
    """The pseudonym key from ``path`` (default :func:`default_secret_path`), created if absent.

    Creation writes a temporary file and hard-links it into place, so two processes racing
    to create it end up with one key, never a half-written file.
    """
    path = Path(path) if path is not None else default_secret_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".deid-secret.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                pass  # another process won the race: use its key
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DeidSecretError(path, f"cannot read the pseudonym secret ({err})") from err
    if len(text) < _MIN_SECRET_CHARS:
        raise DeidSecretError(
            path, f"pseudonym secret is too short ({len(text)} characters, need {_MIN_SECRET_CHARS}+)"
        )
    return text.encode("ascii")


def _digest(secret: bytes, kind: str, *parts: str) -> bytes:
    message = "\x1f".join((kind, *parts)).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()


def pseudonymous_uid(secret: bytes, uid: str) -> str:
    """A stable ``2.25.<int>`` stand-in for ``uid`` (same key and UID -> same result)."""
    return "2.25." + str(int.from_bytes(_digest(secret, "uid", str(uid))[:16], "big"))


@dataclass(frozen=True)
class Pseudonym:
    """Pseudonymous Patient ID and Patient's Name derived from one identity key."""

    patient_id: str
    patient_name: str


def patient_identity_key(
    patient_id: str = "",
    issuer_of_patient_id: str = "",
    patient_name: str = "",
    patient_birth_date: str = "",
    study_uid: str = "",
    source: str = "",
) -> tuple[str, ...] | None:
    """What identifies the patient, strongest first: (issuer, ID), else (name, birth date),
    else the study (one study belongs to one patient), else the source file of a non-DICOM
    volume; ``None`` when nothing is known."""
    if patient_id.strip():
        return ("id", issuer_of_patient_id.strip(), patient_id.strip())
    if patient_name.strip():
        return ("name", patient_name.strip().upper(), patient_birth_date.strip())
    if study_uid.strip():
        return ("study", study_uid.strip())
    if source.strip():
        return ("source", source.strip())
    return None


def pseudonymize_patient(secret: bytes, identity: tuple[str, ...] | None) -> Pseudonym:
    """The pseudonym of ``identity``; a fresh random one when the identity is unknown
    (an unknown patient must never be merged with another)."""
    if identity is None:
        raw = secrets.token_bytes(15)
    else:
        raw = _digest(secret, "patient", *identity)[:15]
    code = base64.b32encode(raw).decode("ascii")  # 24 characters, A-Z2-7: safe in LO and PN
    return Pseudonym(patient_id=f"{PSEUDONYM_PREFIX}-{code}", patient_name=f"{PSEUDONYM_PREFIX}^{code}")
