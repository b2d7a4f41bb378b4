"""Checksums of a released model: a `SHA256SUMS` file beside the model is a promise to keep.

`make release` writes `dist/<model>-<version>/SHA256SUMS` in `sha256sum` format
("<hex digest>  <file name>" per line, so `sha256sum -c SHA256SUMS` checks it too). When a model
is loaded from a folder holding that file, its bytes must match its line: a copy damaged on an SD
card or edited by hand is refused rather than screened with.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from edge_app.errors import ModelError

SUMS_FILE = "SHA256SUMS"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def read_sums(path: Path) -> dict[str, str]:
    """File name -> sha256 hex digest, from a SHA256SUMS file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ModelError("checksum_mismatch", f"{SUMS_FILE} cannot be read: {exc.strerror or exc}", path) from exc
    except UnicodeDecodeError as exc:
        raise ModelError("checksum_mismatch", f"{SUMS_FILE} is not a text file (byte {exc.start} is not "
                         "UTF-8): it is damaged; reinstall the release", path) from exc
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ModelError("checksum_mismatch", f"{SUMS_FILE} line {number} is not "
                             f"'<sha256>  <file>': {line[:80]!r}", path)
        sums[match.group(2)] = match.group(1).lower()
    return sums


def write_sums(folder: Path, names: list[str]) -> Path:
    """Write folder/SHA256SUMS for the named files of the folder."""
    folder = Path(folder)
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}" for n in sorted(names)]
    path = folder / SUMS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def verify(model_path: Path, data: bytes) -> bool:
    """Check the model's bytes against a SHA256SUMS beside it; False when there is none."""
    sums_path = Path(model_path).parent / SUMS_FILE
    if not sums_path.is_file():
        return False
    expected = read_sums(sums_path).get(Path(model_path).name)
    if expected is None:
        raise ModelError("checksum_mismatch", f"the model is not listed in {sums_path}: "
                         "it is not part of this release", model_path)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelError("checksum_mismatch", f"the model file is damaged or was changed: its sha256 is "
                         f"{actual[:16]}..., {SUMS_FILE} expects {expected[:16]}...; reinstall the release",
                         model_path)
    return True
