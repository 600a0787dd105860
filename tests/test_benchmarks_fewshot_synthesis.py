"""Synthesis manifest and the resumable worker, with a real (trivial) augmentation generator."""
import csv
import hashlib
import re

import pytest
from fewshot_digits import single_torch_thread, augment_generator, digits_spec, write_digits_source

from benchmarks.fewshot import data
from benchmarks.fewshot.registry import UnknownNameError
from benchmarks.fewshot.sampling import draw_supports
from benchmarks.fewshot.synthesis import (SynthesisError, build_manifest, get_generator, images_by_support,
                                          per_concept, read_manifest, register_generator, run_manifest,
                                          write_manifest)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    spec = digits_spec(write_digits_source(root / "src"))
    ds = data.load_prepared(spec, data.prepare(spec, root / "prep", cache_dir=str(root / "hf"), progress=False))
    supports = draw_supports(spec, data.class_index(ds), "test", [1, 2], trials=2, seed=0)
    refs = {s.key: data.export_images(ds, s.rows, root / "refs") for s in supports}
    return spec, supports, refs


def _manifest(setup, out, methods=("augment", "real-only", "jitter"), seed=0, identity=lambda m: {"method": m}):
    spec, supports, refs = setup
    return build_manifest(supports, methods, 3, out, lambda s: refs[s.key], lambda c: f"a photo of a {c}", seed,
                          identity=identity)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_lists_every_image_deterministically(setup, tmp_path):
    rows = _manifest(setup, tmp_path / "synth")
    assert len(rows) == 2 * (3 * 2 * 2) * 3  # 2 generating methods x (classes x shots x trials) x M
    assert rows == _manifest(setup, tmp_path / "synth")
    assert len({r.path for r in rows}) == len(rows)
    r = rows[0]
    assert re.search(r"augment/eight/1shot-t0-[0-9a-f]{10}-000\.png$", r.path) and r.prompt == "a photo of a eight"
    assert len(r.refs.split(";")) == r.shot
    # a group is the contrast set: every test class at one (method, shot, trial), with one seed
    group = [x for x in rows if x.group == r.group]
    assert {x.class_name for x in group} == set(setup[0].classes["test"]) and {x.seed for x in group} == {r.seed}
    assert len({x.group for x in rows}) == 2 * 2 * 2 and len({x.seed for x in rows}) == 8
    assert [x.seed for x in _manifest(setup, tmp_path / "synth", seed=1)] != [x.seed for x in rows]
    # what made an image is in its name: other generation settings never reuse old files
    other = _manifest(setup, tmp_path / "synth", identity=lambda m: {"method": m, "lr": 0.5})
    assert [x.seed for x in other] == [x.seed for x in rows] and not {x.path for x in other} & {x.path for x in rows}
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
    report = run_manifest(rows, resolve=lambda m: per_concept(counting), progress=False)
    assert (report.made, report.skipped, report.groups_run) == (len(rows), 0, 4) and len(calls) == 12
    digests = {r.path: _digest(tmp_path / r.path) for r in rows}
    calls.clear()
    report = run_manifest(rows, resolve=lambda m: per_concept(counting), progress=False)
    assert (report.made, report.skipped, calls) == (0, len(rows), [])
    # an interrupted run: one image of one group is missing -> only that group runs, only that file is written
    victim = rows[4]
    (tmp_path / victim.path).unlink()
    report = run_manifest(rows, resolve=lambda m: per_concept(counting), progress=False)
    assert (report.made, report.groups_run, len(calls)) == (1, 1, 3)
    assert all(_digest(tmp_path / r.path) == d for r, d in zip(rows, digests.values()))  # same bytes (seeded)
    assert victim.path in images_by_support(rows, "augment")[(victim.class_name, victim.shot, victim.trial)]


def test_a_group_generator_gets_the_whole_contrast_set(setup, tmp_path):
    rows = _manifest(setup, tmp_path / "synth", methods=("augment",))
    seen = []

    def contrastive(concepts, outs, seed):
        seen.append(([p for p, _ in concepts], [len(o) for o in outs]))
        for (prompt, refs), o in zip(concepts, outs):
            augment_generator(prompt, refs, o, seed)

    run_manifest(rows, resolve=lambda m: contrastive, progress=False)
    classes = sorted(setup[0].classes["test"])
    assert seen == [([f"a photo of a {c}" for c in classes], [3] * len(classes))] * 4


def test_worker_errors_name_the_class_and_image(setup, tmp_path):
    rows = _manifest(setup, tmp_path / "synth", methods=("augment",))

    def broken(prompt, refs, outs, seed):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(SynthesisError, match=r"method 'augment', 1-shot, trial 0, classes .*: generator failed while "
                                             r"making .*eight/1shot-t0-\w+-000.png"):
        run_manifest(rows, resolve=lambda m: per_concept(broken), progress=False)

    def lazy(prompt, refs, outs, seed):
        augment_generator(prompt, refs, outs[:-1], seed)  # forgets the last image

    with pytest.raises(SynthesisError, match=r"image .*1shot-t0-\w+-002.png was not written"):
        run_manifest(rows, resolve=lambda m: per_concept(lazy), progress=False)
    assert not (tmp_path / rows[0].path).exists()  # nothing from the failed group was published


def test_generator_lookup(tmp_path):
    register_generator("augment-test", augment_generator, overwrite=True)
    assert get_generator("augment-test").one_concept is augment_generator
    assert get_generator("fewshot_digits:augment_generator").one_concept is augment_generator
    assert get_generator("seedselect").__name__ == "pipelines:seedselect"
    with pytest.raises(UnknownNameError, match="did you mean 'seedselect'"):
        get_generator("seed-select")
    with pytest.raises(ValueError, match="reserved"):
        register_generator("real-only", augment_generator)


def test_settings_chosen_on_validation_classes_override_the_method_settings(tmp_path):
    from benchmarks.fewshot.synthesis import Generation, apply_selection

    settings = {"preset": "fast", "methods": {"seedselect": {"guidance_scale": 1.0, "iterations": 3}}}
    selection = tmp_path / "selection.json"
    selection.write_text('{"chosen": {"seedselect": {"guidance_scale": 7.5, "lr_after": 0.1}}}')
    chosen = apply_selection(settings, selection)
    assert chosen["methods"]["seedselect"] == {"guidance_scale": 7.5, "iterations": 3, "lr_after": 0.1}
    assert apply_selection(settings, None) is settings
    gen = Generation(chosen, {"seedselect-per-concept": {"method": "seedselect", "semantic_loss": "per_concept"}})
    s = gen.identity("seedselect-per-concept")["settings"]   # a variant keeps the chosen values
    assert (s["guidance_scale"], s["lr_after"], s["semantic_loss"]) == (7.5, 0.1, "per_concept")
    assert gen.identity("seedselect")["settings"]["semantic_loss"] == "contrastive"
    with pytest.raises(FileNotFoundError, match="run the stage that writes it"):
        apply_selection(settings, tmp_path / "nope.json")


def test_a_negatives_table_enters_the_identity_of_contrastive_methods_only(tmp_path):
    from benchmarks.fewshot.synthesis import generation_identity, read_negatives, write_negatives
    from PIL import Image

    refs = []
    for k in range(2):
        refs.append(tmp_path / f"r{k}.png")
        Image.new("RGB", (8, 8), (k * 100, 0, 0)).save(refs[-1])
    table = write_negatives(tmp_path / "negatives.json", [("cat", [str(refs[0])]), ("dog", [str(refs[1])])])
    settings = {"preset": "fast", "negatives": str(table)}
    ss = generation_identity("seedselect", settings)
    assert ss["negatives"] == read_negatives(table)["sha256"]
    assert "negatives" not in generation_identity("sd", settings)
    assert "negatives" not in generation_identity("seedselect", {**settings, "methods": {
        "seedselect": {"semantic_loss": "per_concept"}}})
    Image.new("RGB", (8, 8), (0, 0, 255)).save(refs[1])   # same path, new content: a new identity
    write_negatives(table, [("cat", [str(refs[0])]), ("dog", [str(refs[1])])])
    assert generation_identity("seedselect", settings)["negatives"] != ss["negatives"]
    table.write_text("{not json")
    with pytest.raises(ValueError, match="negatives table .* is damaged"):
        generation_identity("seedselect", settings)
    with pytest.raises(FileNotFoundError, match="synthesize stage writes it"):
        generation_identity("seedselect", {**settings, "negatives": str(tmp_path / "none.json")})
