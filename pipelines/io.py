"""Atomic artifact writing: a file appears under its final name complete or not at all, so an
interrupted run never leaves a half-written image, seed or manifest that a rerun would trust."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` instead of being replaced.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing artifact: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite)


def save_image(path: str | os.PathLike, image, overwrite: bool = True) -> Path:
    """Save a PIL image; the format is taken from the final name's suffix."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    with atomic_path(path, overwrite) as tmp:
        image.save(tmp, format=fmt)
    return Path(path)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                 overwrite: bool = True) -> Path:
    """Save small learned tensors (seeds, token embeddings) as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(path, overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)
