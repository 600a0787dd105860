"""Synthesis shared by several processes (issue 13): claim files, and a CPU rehearsal of a multi-GPU run
under `accelerate launch` (torchrun's launcher; on a CPU-only machine each process takes the CPU):
two processes make exactly the manifest and images one process makes, and a run whose worker is
killed loses nothing and redoes nothing finished when it is rerun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fewshot_digits import digits_spec, write_digits_source

from benchmarks.fewshot.synthesis import read_manifest
from benchmarks.worksharing import ClaimBoard
from pipelines.testing import save_tiny_image_encoder, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--no_python"]


def test_claims_are_exclusive_and_dead_owners_are_taken_over(tmp_path):
    a, b = ClaimBoard(tmp_path, stale_after_s=30, heartbeat_s=0.05), ClaimBoard(tmp_path, stale_after_s=30)
    assert a.try_claim("g1") and not b.try_claim("g1") and b.try_claim("g2")
    with a.holding("g1"):
        before = a.path("g1").stat().st_mtime_ns
        time.sleep(0.3)
        assert a.path("g1").stat().st_mtime_ns > before      # the heartbeat keeps it fresh
        assert not b.try_claim("g1")
    assert not a.path("g1").exists() and b.try_claim("g1")   # released when the work is done
    # a claim whose process is gone (killed) is taken over at once on its host ...
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a.path("g3").write_text(json.dumps({"owner": f"{os.uname().nodename}:{int(dead.stdout)}:x"}))
    assert b.try_claim("g3")
    # ... and one from another host once its heartbeat is older than stale_after_s
    a.path("g4").write_text(json.dumps({"owner": "elsewhere:1:x"}))
    assert not b.try_claim("g4")
    old = time.time() - 60
    os.utime(a.path("g4"), (old, old))
    assert b.try_claim("g4") and not a.try_claim("g4")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    spec = digits_spec(write_digits_source(root / "src"))
    (root / "spec.json").write_text(json.dumps(spec.to_json()))
    save_tiny_pipeline(root / "sd")
    save_tiny_image_encoder(root / "clip")
    return root


def _params(root: Path, name: str) -> Path:
    params = {"fewshot": {
        "benchmarks": [str(root / "spec.json")], "data_dir": str(root / name), "results_dir": str(root / "results"),
        "hf_cache_dir": str(root / "hf"), "seed": 0, "ways": 3, "shots": [1, 2], "queries": 3, "trials": 3,
        "val_episodes": 2, "test_episodes": 2, "progress": False,
        "synthesis": {"methods": ["seedselect"], "images_per_support": 3, "prompt_template": "{}",
                      "settings": {"preset": "fast", "model": str(root / "sd"), "image_encoder": str(root / "clip"),
                                   "device": "cpu", "methods": {"seedselect": {
                                       "num_inference_steps": 3, "iterations": 3, "bootstrap_iterations": 2,
                                       "batch_size": 3, "last_k_weights": [1.0]}}}}}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _stage(params: Path, stage: str, launcher=(), **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*launcher, sys.executable, "-m", "benchmarks.fewshot", stage, "--params", str(params)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(params: Path, stage: str, launcher=()) -> str:
    proc = _stage(params, stage, launcher)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _images(root: Path, name: str) -> dict[str, bytes]:
    d = root / name / "digits"
    return {str(Path(r.path).relative_to(d)): Path(r.path).read_bytes() for r in read_manifest(d / "synthesis.csv")}


def test_two_processes_make_what_one_makes(project):
    one, two = _params(project, "one"), _params(project, "two")
    for p in (one, two):
        _run(p, "download")
        _run(p, "episodes")
    _run(one, "synthesize")
    log = _run(two, "synthesize", ACCELERATE)
    made = [int(line.split(" images made")[0].rsplit(" ", 1)[-1]) for line in log.splitlines() if "images made" in line]
    assert len(made) == 2 and all(n > 0 for n in made) and sum(made) == 3 * 2 * 3 * 3   # both worked, none twice
    a, b = _images(project, "one"), _images(project, "two")
    assert len(a) == 54 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), "2 processes made other images than 1 process"


def test_a_killed_worker_loses_nothing_and_nothing_finished_is_redone(project):
    import psutil

    params = _params(project, "killed")
    _run(params, "download")
    _run(params, "episodes")
    synthetic = project / "killed" / "digits" / "synthetic"
    proc = _stage(params, "synthesize", ACCELERATE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(synthetic.rglob("*.png"))) < 9:   # one contrast set published
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "synthesize" in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline())]
    assert workers, "no worker process found"
    workers[0].send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    os.killpg(proc.pid, signal.SIGKILL) if psutil.pid_exists(proc.pid) else None
    published = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in synthetic.rglob("*.png")}
    runs = {p: p.stat().st_mtime_ns for p in (project / "killed" / "digits" / "generation-runs").rglob("*-0000?.png")}
    assert 9 <= len(published) < 54
    _run(params, "synthesize")
    after = _images(project, "killed")
    assert len(after) == 54                                                   # nothing lost
    assert all(p.stat().st_mtime_ns == t and p.read_bytes() == b for p, (t, b) in published.items())
    assert all(p.stat().st_mtime_ns == t for p, t in runs.items())            # no finished image redone
    assert not list((project / "killed" / "digits" / "synthesis-claims").glob("*.claim"))
