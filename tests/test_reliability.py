"""Faults a real run meets, through the CLI on tiny models: damaged outputs and caches (truncated,
emptied, overwritten with garbage), a full disk, a read-only output folder, SIGTERM / SIGKILL at
random points. Each case checks: a clear one-line message (never a traceback), nothing finished lost
or redone, damaged work redone (byte-identical to an undisturbed run)."""
import builtins
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pipelines import cli_args, noise_image

from pipelines import io as pio
from pipelines.__main__ import main as cli
from pipelines.testing import save_tiny_image_encoder, save_tiny_pipeline

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
NAO = ("nao-seedselect", "--num-images", "3", "--iterations", "1", "--batch-size", "1", "--set", "inversion_steps=3",
       "--set", "n_points=4", "--set", "last_k_weights=1")
SD = ("sd", "--num-images", "4")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_pipeline(root / "sd")
    save_tiny_image_encoder(root / "clip")
    (root / "refs").mkdir()
    for i in range(2):
        noise_image(i).save(root / "refs" / f"r{i}.png")
    return root


def args_for(folders, out, case):
    return cli_args(folders, case[0], out, *case[1:])


@pytest.fixture(scope="module")
def baseline(folders, tmp_path_factory):
    """Undisturbed runs: the sd one (outputs only) and the NAO-SeedSelect one (outputs and all caches)."""
    root = tmp_path_factory.mktemp("baseline")
    for name, case in (("sd", SD), ("nao", NAO)):
        assert cli(args_for(folders, root / name, case)) == 0
    return root


def untimed(obj):
    """``obj`` without what says when it was made or how long it took."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k != "created" and not k.endswith("seconds")}
    return [untimed(v) for v in obj] if isinstance(obj, list) else obj


def content(p: Path) -> bytes:
    """What must be identical when an artifact is redone: all but timings (PNG bytes, tensor bytes)."""
    if p.suffix == ".json":
        record = untimed(json.loads(p.read_text()))
        record.pop("checksums", None)  # its image and seeds are compared themselves
        return json.dumps(record, sort_keys=True).encode()
    if p.suffix == ".safetensors":
        return pio._split_safetensors(p.read_bytes())[1]
    return p.read_bytes()


def digests(folder: Path) -> dict[str, str]:
    """name -> sha256 of every finished artifact (the contact sheet and config are rewritten by design)."""
    return {str(p.relative_to(folder)): hashlib.sha256(content(p)).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith((".contact.png", ".config.json"))}


def stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "zero":
        path.write_bytes(b"")
    else:  # same size, garbage in the middle: only a content hash can tell
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(random.Random(0).randbytes(16)) + data[mid + 16:])


# ------------------------------------------------------------------------------------ damage
@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
@pytest.mark.parametrize("kind", [".png", ".safetensors", ".json"])
def test_damaged_finished_image_is_redone_and_nothing_else(folders, baseline, tmp_path, capsys, caplog, kind, how):
    out = tmp_path / "out"
    shutil.copytree(baseline / "sd", out)
    victim = next(p for p in out.glob("sd-*-00002*") if p.suffix == kind and "contact" not in p.name)
    damage(victim, how)
    before = stamps(out)
    assert cli(args_for(folders, out, SD)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert any(victim.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert digests(out) == digests(baseline / "sd")  # the damaged image redone, byte-identical
    redone = {p for p, t in stamps(out).items() if before.get(p) != t}
    assert all("-00002." in p.name or p.name.endswith((".contact.png", ".config.json")) for p in redone), redone
    assert not temporaries(out)


@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
@pytest.mark.parametrize("cache", ["refenc", "inverted", "nao"])
def test_damaged_cache_is_recomputed(folders, baseline, tmp_path, capsys, caplog, cache, how):
    out = tmp_path / "out"
    shutil.copytree(baseline / "nao", out)
    victim = next((out / "cache").glob(f"{cache}-*.safetensors"))
    damage(victim, how)
    for p in out.glob("nao-seedselect-*-00001.*"):  # an unfinished image: the caches are needed again
        p.unlink()
    assert cli(args_for(folders, out, NAO)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert any(victim.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert digests(out) == digests(baseline / "nao")  # cache and image made again, byte-identical


def test_files_follow_the_umask(folders, tmp_path):
    old = os.umask(0o027)
    try:
        assert cli(args_for(folders, tmp_path / "out", ("sd", "--num-images", "1"))) == 0
        with pio.atomic_dir(tmp_path / "model") as d:
            (d / "w").write_bytes(b"x")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 5 and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == oct(0o750)


# ------------------------------------------------------------------------------------ full disk, read-only
def fail_writes_under(monkeypatch, folder: Path, code: int, allowed: int = 0) -> None:
    """After ``allowed`` files written under ``folder``, every write there fails with ``code`` after
    a few bytes (a partial temporary file is left for the writer to clean up), as on a full disk."""
    real_open, count = builtins.open, [0]

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:7])
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def hooked(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") \
                and Path(file).resolve().is_relative_to(folder.resolve()):
            count[0] += 1
            if count[0] > allowed:
                return Failing(f)
        return f

    monkeypatch.setattr(builtins, "open", hooked)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_is_one_line_and_keeps_finished_images(folders, baseline, tmp_path, capsys,
                                                                      monkeypatch, code, reason):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_writes_under(m, out, code, allowed=1 + 3 * 2)  # the config, two images, then the disk fails
        assert cli(args_for(folders, out, SD)) == 2
    line = one_line_error(capsys.readouterr().err, reason, str(out))
    assert "-00002.png" in line  # names the file it could not write
    assert not temporaries(out)
    finished = digests(out)
    assert len(finished) == 6 and all(finished[k] == v for k, v in digests(baseline / "sd").items() if k in finished)
    before = stamps(out)
    assert cli(args_for(folders, out, SD)) == 0  # space again: resumes, redoes nothing finished
    assert digests(out) == digests(baseline / "sd")
    assert all(stamps(out)[p] == t for p, t in before.items() if not p.name.endswith((".contact.png", ".config.json")))


def test_full_then_read_only_filesystem_for_real(folders, tmp_path):
    """A real 40 KiB tmpfs as the output folder, then remounted read-only, then given space: in a user
    + mount namespace (``unshare -rm``), since root, as the tests run here, ignores chmod."""
    out, log = tmp_path / "out", tmp_path / "log"
    out.mkdir()
    log.mkdir()
    cmd = " ".join([sys.executable, "-m", "pipelines", *args_for(folders, out, ("sd", "--num-images", "6"))])
    state = f"stat -c '%n %i %Y' {out}/sd-*-0000?.*"
    script = (f"mount -t tmpfs -o size=40k none {out} || exit 99\n"
              f"{cmd} 2> {log}/full.err; echo $? > {log}/full.rc; {state} > {log}/full.state\n"
              f"mount -o remount,ro {out}\n{cmd} 2> {log}/ro.err; echo $? > {log}/ro.rc\n"
              f"mount -o remount,rw,size=1m {out}\n{cmd} 2> {log}/ok.err; echo $? > {log}/ok.rc; {state} > {log}/ok.state\n")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode == 99 or "unshare" in proc.stderr:
        pytest.skip(f"no user + mount namespaces here: {proc.stderr.strip()}")
    read = lambda name: (log / name).read_text()  # noqa: E731
    assert read("full.rc").strip() == "2"
    one_line_error(read("full.err"), "no space left on the device", str(out))
    assert read("ro.rc").strip() == "2"
    one_line_error(read("ro.err"), "read-only file system", str(out))
    assert read("ok.rc").strip() == "0", read("ok.err")
    written = read("full.state").splitlines()
    assert ".tmp" not in "".join(written)  # no partial file left
    finished = {line.split()[0].rsplit(".", 1)[0] for line in written if line.split()[0].endswith(".json")}
    kept = [line for line in written if line.split()[0].rsplit(".", 1)[0] in finished]
    assert len(finished) >= 1 and len(kept) == 3 * len(finished)  # records only of whole images
    assert set(kept) <= set(read("ok.state").splitlines())  # same inode and mtime: kept, not redone
    assert len(read("ok.state").splitlines()) == 18


# ------------------------------------------------------------------------------------ kills
@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 0), (signal.SIGKILL, 5)])  # kills after 1 and 2 images
def test_killed_run_resumes_without_losing_or_redoing_work(folders, baseline, tmp_path, capsys, sig, seed):
    rng = random.Random(seed)
    out = tmp_path / "out"
    case = ("sd", "--num-images", "4", "--steps", "40")  # slow enough to be caught mid-run
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", *args_for(folders, out, case)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    # once the run has started (its config written), kill after this many finished images plus a
    # random fraction of the next (a kill during Python's start-up writes nothing at all)
    after = rng.randrange(3)
    deadline = time.monotonic() + 240

    def waiting():
        return proc.poll() is None and time.monotonic() < deadline and (
            not list(out.glob("*.config.json")) or len(list(out.glob("sd-*-0000?.json"))) < after)

    while waiting():
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0, "finished before the kill: make the run slower"
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        one_line_error(err, "interrupted by SIGTERM")
        assert not temporaries(out)
    finished = {p for p in out.glob("sd-*-0000?.json")}
    assert after <= len(finished) < 4
    before = stamps(out)
    assert cli(args_for(folders, out, case)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert len(list(out.glob("sd-*-0000?.png"))) == 4
    for rec in finished:  # finished images kept as they were
        for p in out.glob(rec.stem + ".*"):
            assert stamps(out)[p] == before[p], f"{p.name} was redone"
    assert all(pio.read_record(r) is not None for r in out.glob("sd-*-0000?.json"))


# ------------------------------------------------------------------------------------ benchmark artifacts
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fewshot_digits import digits_spec, write_digits_source

    from benchmarks.fewshot import data

    root = tmp_path_factory.mktemp("digits")
    spec = digits_spec(write_digits_source(root / "src"))
    return spec, data.prepare(spec, root / "prep", cache_dir=str(root / "hf"), progress=False)


def warned(caplog, path: Path) -> bool:
    return any(path.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
def test_damaged_prepared_dataset_is_rebuilt(digits, tmp_path, caplog, how):
    from benchmarks.fewshot import data

    spec, prepared = digits
    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy)
    victim = next(copy.glob("*.arrow"))
    damage(victim, how)
    data.prepare(spec, copy, cache_dir=str(tmp_path / "hf"), progress=False)
    assert warned(caplog, victim)
    assert digests(copy) == digests(prepared)  # rebuilt byte-identical (fingerprint pinned to the data)


@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
def test_damaged_features_and_synthetic_images_are_redone(digits, tmp_path, caplog, how):
    from fewshot_digits import augment_generator

    from benchmarks.fewshot import data
    from benchmarks.fewshot.backbones import cached_features
    from benchmarks.fewshot.sampling import draw_supports
    from benchmarks.fewshot.synthesis import build_manifest, per_concept, run_manifest

    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.0).reshape(3, 4)

    path = tmp_path / "features.safetensors"
    first = cached_features(path, ["a", "b", "c"], compute)
    damage(path, how)
    assert torch.equal(cached_features(path, ["a", "b", "c"], compute), first) and len(calls) == 2
    assert warned(caplog, path)
    assert torch.equal(cached_features(path, ["a", "b", "c"], compute), first) and len(calls) == 2  # reused

    spec, prepared = digits
    ds = data.load_prepared(spec, prepared)
    support = draw_supports(spec, data.class_index(ds), "test", [1], trials=1, seed=0)[0]
    refs = data.export_images(ds, support.rows, tmp_path / "refs")
    rows = build_manifest([support], ("augment",), 3, tmp_path / "synth", lambda s: refs, lambda c: c, 0)
    run_manifest(rows, resolve=lambda m: per_concept(augment_generator), progress=False)
    made = digests(tmp_path / "synth")
    victim, ref = Path(rows[1].path), refs[0]
    damage(victim, how)
    damage(ref, how)
    assert data.export_images(ds, support.rows, tmp_path / "refs") == refs and warned(caplog, ref)
    report = run_manifest(rows, resolve=lambda m: per_concept(augment_generator), progress=False)
    assert (report.made, report.skipped) == (1, 2) and warned(caplog, victim)
    assert digests(tmp_path / "synth") == made


@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
def test_damaged_dct_token_is_retrained(tmp_path, caplog, monkeypatch, how):
    from test_dct import classifier, fast

    from pipelines.dct import DctPipeline, DctToken, train_or_load_token
    from pipelines.testing import tiny_components

    pipe = DctPipeline.from_components(tiny_components())
    trained = []

    def train(self, name, clf, index, settings, progress=True):
        trained.append(name)
        return DctToken(torch.linspace(0, 1, 16), name, index, {"epochs": 1})

    monkeypatch.setattr(DctPipeline, "train_token", train)
    token, path = train_or_load_token(pipe, classifier(), "tiger cat", tmp_path, fast(), progress=False)
    damage(path, how)
    again, _ = train_or_load_token(pipe, classifier(), "tiger cat", tmp_path, fast(), progress=False)
    assert len(trained) == 2 and warned(caplog, path) and torch.equal(again.embedding, token.embedding)
    train_or_load_token(pipe, classifier(), "tiger cat", tmp_path, fast(), progress=False)
    assert len(trained) == 2  # the redone token is reused
