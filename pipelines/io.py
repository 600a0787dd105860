"""The one artifact layer: files are written atomically, readable as the umask says, and verified
before a rerun trusts them.

Writing (``atomic_path``, ``atomic_dir``, ``write_bytes/text/json``, ``save_image``, ``save_tensors``,
``write_record``, ``make_dirs``):

* a file or folder appears under its final name complete or not at all (written beside it under a
  temporary name, then renamed), so an interrupted run never leaves a half-written artifact;
* it gets the mode the umask says (0644 / 0755 under the usual 022), not the private 0600 / 0700
  of ``tempfile``, so colleagues on a shared filesystem can read a run's results;
* a full disk, a read-only filesystem or a permission error raises :class:`ArtifactWriteError`, one
  line naming the path and the reason; the temporary file is removed and the final name (perhaps
  an earlier, finished artifact) is left untouched.

Reading (verify before trust): every artifact a rerun would skip is checked first, cheaply:

* ``save_tensors`` stores the sha256 of the tensor bytes in the safetensors header;
  :func:`load_tensors` checks the header, the size and that hash;
* :func:`write_record` writes a JSON record *last*, listing the size and sha256 of the files it
  describes (an image and its seeds); :func:`read_record` re-hashes them;
* :func:`check_image` decodes an image fully (for images made by other programs, with no record);
  :func:`load_json` parses; :func:`load_whole` runs any loader that checks its format (``.npz``
  zip CRCs, torch checkpoints).

On damage (truncated, zero bytes, garbage, missing companion) a reader logs one warning naming the
file and what is wrong, removes the damaged file(s) and returns ``None``: the caller recomputes, as
if the artifact had never been made. Files written before hashes were recorded are checked only
structurally (they must parse or decode completely).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

HASH_KEY = "content_sha256"  # safetensors metadata key: sha256 of the data section
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}


class ArtifactWriteError(RuntimeError):
    """An artifact could not be written (disk full, read-only or forbidden output folder)."""


@contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full / read-only / permission ``OSError`` raised inside into an ArtifactWriteError."""
    try:
        yield
    except OSError as e:
        if e.errno not in _REASONS:
            raise
        raise ArtifactWriteError(f"cannot write {path}: {_REASONS[e.errno]}") from e


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_dirs(path: str | os.PathLike) -> Path:
    path = Path(path)
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` instead of being replaced.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing artifact: {path}")
    with write_errors(path):
        make_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, so a model
    folder is complete or absent (a killed training never leaves a half-saved model behind)."""
    path = Path(path)
    with write_errors(path):
        make_dirs(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tmp.chmod(0o777 & ~_umask())
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite)


def save_image(path: str | os.PathLike, image, overwrite: bool = True) -> Path:
    """Save a PIL image; the format is taken from the final name's suffix."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return write_bytes(path, buf.getvalue(), overwrite)


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file's bytes; raises ValueError if it cannot be one."""
    if len(blob) < 8:
        raise ValueError(f"{len(blob)} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"header length {n} beyond the file's {len(blob)} bytes")
    header = json.loads(blob[8:8 + n])
    return header, blob[8 + n:]


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                 overwrite: bool = True) -> Path:
    """Save tensors as safetensors, with the sha256 of their bytes in the metadata (see load_tensors)."""
    from safetensors.torch import save

    header, data = _split_safetensors(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
    # the header is rebuilt with sorted keys: safetensors orders metadata at random, and the same
    # tensors must give the same bytes (reproducible stages, comparable reruns)
    header["__metadata__"] = {**{k: str(v) for k, v in (metadata or {}).items()},
                              HASH_KEY: hashlib.sha256(data).hexdigest()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return write_bytes(path, struct.pack("<Q", len(text)) + text + data, overwrite)


def discard(path: str | os.PathLike, problem: str, what: str = "artifact") -> None:
    """Warn that ``path`` is damaged and remove it, so that it is made again."""
    log.warning("damaged %s %s (%s): removed, it will be made again", what, path, problem)
    with write_errors(path):
        Path(path).unlink(missing_ok=True)


def _problem(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def load_tensors(path: str | os.PathLike, what: str = "tensors") -> tuple[dict, dict] | None:
    """(tensors, metadata) of a safetensors file that is whole; ``None`` if it is absent, or damaged
    (then removed with a warning)."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        return None
    try:
        blob = path.read_bytes()
        header, data = _split_safetensors(blob)
        meta = dict(header.get("__metadata__") or {})
        if HASH_KEY in meta and hashlib.sha256(data).hexdigest() != meta[HASH_KEY]:
            raise ValueError("content does not match its recorded sha256")
        tensors = load(blob)  # checks every tensor's offsets against the data size
    except Exception as e:
        discard(path, _problem(e), what)
        return None
    meta.pop(HASH_KEY, None)
    return tensors, meta


def load_whole(path: str | os.PathLike, load: Callable[[Path], Any], what: str = "artifact") -> Any | None:
    """``load(path)`` if ``path`` exists and loads completely; ``None`` if absent, or if ``load``
    raises (the file is then damaged: removed with a warning). For formats that check themselves
    (zip CRCs of ``.npz``, torch checkpoints)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as e:
        discard(path, _problem(e), what)
        return None


def load_json(path: str | os.PathLike, what: str = "record") -> Any | None:
    """The parsed JSON file; ``None`` if absent or damaged (then removed with a warning)."""
    return load_whole(path, lambda p: json.loads(p.read_bytes()), what)


def _decode_image(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
    return True


def check_image(path: str | os.PathLike, what: str = "image") -> bool:
    """Whether ``path`` is an image that decodes completely; a damaged one is removed with a warning."""
    return load_whole(path, _decode_image, what) is not None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_record(path: str | os.PathLike, record: dict, files: Mapping[str, str | os.PathLike],
                 overwrite: bool = False) -> Path:
    """Write the JSON ``record`` of finished ``files`` (name -> path, beside it) last, with each file's
    size and sha256 under ``"checksums"``: its presence then vouches for them (see read_record)."""
    sums = {k: {"file": Path(p).name, "size": Path(p).stat().st_size, "sha256": file_sha256(p)}
            for k, p in files.items()}
    return write_json(path, {**record, "checksums": sums}, overwrite)


def _check_structure(path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        load(path.read_bytes())
    elif path.suffix == ".json":
        json.loads(path.read_bytes())
    else:
        _decode_image(path)


def read_record(path: str | os.PathLike, files: Mapping[str, str | os.PathLike] = {},
                what: str = "record") -> dict | None:
    """The record at ``path`` if it and every file it vouches for are whole, else ``None``: a damaged
    or missing file is named in a warning and removed together with the record, so all are redone.

    ``files`` (name -> path) are the companions to check structurally when the record predates
    checksums."""
    path = Path(path)
    record = load_json(path, what)
    if record is None:
        return None
    sums = record.get("checksums") if isinstance(record, dict) else None
    if sums is None:
        sums = {k: {"file": Path(p).name} for k, p in files.items()}
    for entry in sums.values():
        companion = path.parent / entry["file"]
        try:
            if not companion.is_file():
                raise FileNotFoundError("missing")
            if "sha256" not in entry:
                _check_structure(companion)
            elif companion.stat().st_size != entry["size"]:
                raise ValueError(f"{companion.stat().st_size} bytes, {entry['size']} recorded")
            elif file_sha256(companion) != entry["sha256"]:
                raise ValueError("content does not match its recorded sha256")
        except Exception as e:
            discard(companion, _problem(e), "file")
            discard(path, f"it vouches for the damaged {companion.name}", what)
            return None
    return record


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (report plots)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
