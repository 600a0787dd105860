"""Synthesis manifest and the resumable worker, with a real (trivial) augmentation generator."""
import csv
import hashlib

import pytest
from fewshot_digits import single_torch_thread, augment_generator, digits_spec, write_digits_source

from benchmarks.fewshot import data
from benchmarks.fewshot.registry import UnknownNameError
from benchmarks.fewshot.sampling import draw_supports
from benchmarks.fewshot.synthesis import (SynthesisError, build_manifest, get_generator, images_by_support,
                                          read_manifest, register_generator, run_manifest, write_manifest)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    spec = digits_spec(write_digits_source(root / "src"))
    ds = data.load_prepared(spec, data.prepare(spec, root / "prep", cache_dir=str(root / "hf"), progress=False))
    supports = draw_supports(spec, data.class_index(ds), "test", [1, 2], trials=2, seed=0)
    refs = {s.key: data.export_images(ds, s.rows, root / "refs") for s in supports}
    return spec, supports, refs


def _manifest(setup, out, methods=("augment", "real-only", "jitter"), seed=0):
    spec, supports, refs = setup
    return build_manifest(supports, methods, 3, out, lambda s: refs[s.key], lambda c: f"a photo of a {c}", seed)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_lists_every_image_deterministically(setup, tmp_path):
    rows = _manifest(setup, tmp_path / "synth")
    assert len(rows) == 2 * (3 * 2 * 2) * 3  # 2 generating methods x (classes x shots x trials) x M
    assert rows == _manifest(setup, tmp_path / "synth")
    assert len({r.path for r in rows}) == len(rows)
    r = rows[0]
    assert r.path.endswith("augment/seven/1shot-t0-000.png") and r.prompt == "a photo of a seven"
    assert len(r.refs.split(";")) == r.shot
    assert {x.seed for x in rows if x.group == r.group} == {r.seed}  # one seed per group
    assert len({x.seed for x in rows}) == len({x.group for x in rows})
    assert [x.seed for x in _manifest(setup, tmp_path / "synth", seed=1)] != [x.seed for x in rows]
    path = write_manifest(rows, tmp_path / "m.csv")
    assert read_manifest(path) == rows
    with open(path) as f:
        assert next(csv.reader(f)) == ["path", "method", "benchmark", "class_name", "shot", "trial", "image", "seed",
                                       "prompt", "refs"]


def test_worker_makes_images_then_skips_finished_rows(setup, tmp_path):
    calls = []

    def counting(prompt, refs, outs, seed):
        calls.append((prompt, seed))
        augment_generator(prompt, refs, outs, seed)

    rows = _manifest(setup, tmp_path / "synth", methods=("augment",))
    report = run_manifest(rows, resolve=lambda m: counting, progress=False)
    assert (report.made, report.skipped, report.groups_run) == (len(rows), 0, 12) and len(calls) == 12
    digests = {r.path: _digest(tmp_path / r.path) for r in rows}
    calls.clear()
    report = run_manifest(rows, resolve=lambda m: counting, progress=False)
    assert (report.made, report.skipped, calls) == (0, len(rows), [])
    # an interrupted run: one image of one group is missing -> only that group runs, only that file is written
    victim = rows[4]
    (tmp_path / victim.path).unlink()
    report = run_manifest(rows, resolve=lambda m: counting, progress=False)
    assert (report.made, report.groups_run, len(calls)) == (1, 1, 1)
    assert all(_digest(tmp_path / r.path) == d for r, d in zip(rows, digests.values()))  # same bytes (seeded)
    assert victim.path in images_by_support(rows, "augment")[(victim.class_name, victim.shot, victim.trial)]


def test_worker_errors_name_the_class_and_image(setup, tmp_path):
    rows = _manifest(setup, tmp_path / "synth", methods=("augment",))

    def broken(prompt, refs, outs, seed):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(SynthesisError, match=r"class 'seven', 1-shot, trial 0: generator failed while making .*seven/1shot-t0-000.png"):
        run_manifest(rows, resolve=lambda m: broken, progress=False)

    def lazy(prompt, refs, outs, seed):
        augment_generator(prompt, refs, outs[:-1], seed)  # forgets the last image

    with pytest.raises(SynthesisError, match=r"image .*1shot-t0-002.png was not written"):
        run_manifest(rows, resolve=lambda m: lazy, progress=False)
    assert not (tmp_path / rows[0].path).exists()  # nothing from the failed group was published


def test_generator_lookup(tmp_path):
    register_generator("augment-test", augment_generator, overwrite=True)
    assert get_generator("augment-test") is augment_generator
    assert get_generator("fewshot_digits:augment_generator") is augment_generator
    assert get_generator("seedselect").__name__ == "pipelines:seedselect"
    with pytest.raises(UnknownNameError, match="did you mean 'seedselect'"):
        get_generator("seed-select")
    with pytest.raises(ValueError, match="reserved"):
        register_generator("real-only", augment_generator)
