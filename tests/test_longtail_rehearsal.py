"""Rehearsals of `make imagenet-lt` and `make places-lt`: `dvc repro profiles/<name>/dvc.yaml` in a copy
of the repository with only the benchmark and the model ids swapped (the five-class ImageNet-LT and
Places-LT of tests/longtail_fixtures.py as an ILSVRC2012 / Places365-Standard folder tree, the ImageNet-LT
train list fetched by URL as the real one is downloaded; a tiny random SD and a tiny CLIP built from
configs) and the sizes that must shrink for 2 CPU cores (images per class, references, denoising and
optimisation steps, the classifier, its epochs and image size; the real-heldout bar, off by default,
is switched on at 1 image per class; Places-LT's ImageNet-pretrained weights,
which need the hub, become a from-scratch tiny ResNet that keeps the profile's two learning rates and
step schedule). The stage graph, the methods (SD, SeedSelect, NAO-SeedSelect, DCT guided by zero-shot
CLIP over the class names), the losses, the seeds and the shot groups are the profiles' own. They prove
the GPU paths get from the lists to the accuracy tables."""
import csv
import json
from pathlib import Path

import pytest
import yaml
from longtail_fixtures import PLACES, TRAIN, WNIDS, imagenet_lt_fixture, places_lt_fixture, write_places_tree, write_tree
from rehearsal import copy_repository, dvc, shrink_methods, swap_ids, tiny_models

from pipelines.io import write_json

# profile -> (fixture spec and lists, source tree writer, classes)
PROFILES = {"imagenet-lt": (imagenet_lt_fixture, write_tree, WNIDS),
            "places-lt": (places_lt_fixture, write_places_tree, PLACES)}
METHODS = ["real", "sd", "seedselect", "nao-seedselect", "dct", "real-heldout"]
M = 1   # generated images per rare class


def rehearsal_params(name: str, text: str, swap: dict[str, str], spec_path: Path, images: Path) -> str:
    """The profile's params with every hub id in ``swap`` replaced (each must be named there), the
    fixture as the benchmark, and the sizes shrunk for 2 CPU cores."""
    p = yaml.safe_load(swap_ids(text, swap, f"profiles/{name}/params.yaml"))
    lt = p["longtail"]
    assert lt["benchmarks"] == [name]
    lt.update(benchmarks=[str(spec_path)], image_roots={name: str(images)}, progress=False)
    assert lt["heldout"]["images_per_class"] == 0   # off in the profile: it costs a classifier per loss and seed
    lt["heldout"]["images_per_class"] = M
    s = lt["synthesis"]
    s.update(images_per_class=M, references_per_class=2)
    s["settings"]["device"] = "cpu"
    shrink_methods(s["settings"]["methods"])
    lt["train"].update(model="test_resnet", pretrained=False, image_size=16, epochs=1, batch_size=64, amp=False,
                       num_workers=0, eval_batch_size=256, device="cpu")
    return yaml.safe_dump(p, sort_keys=False)


@pytest.fixture(scope="module", params=list(PROFILES))
def rehearsal(request, tmp_path_factory):
    name = request.param
    make_fixture, write_source, classes = PROFILES[name]
    tmp = tmp_path_factory.mktemp(name)
    repo = copy_repository(tmp / "repo")
    # the fixture under the real benchmark's name: the profile's stage paths are data/longtail/<name>/...
    spec, lists, _ = make_fixture(tmp / "fixture", name=name)
    spec_path = write_json(tmp / "fixture" / "spec.json", spec.to_json())
    images = write_source(tmp / "source-images", lists, unlisted=2)
    params = repo / "profiles" / name / "params.yaml"
    params.write_text(rehearsal_params(name, params.read_text(), tiny_models(tmp / "models"), spec_path, images))
    run = dvc(repo, tmp, "repro", f"profiles/{name}/dvc.yaml")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    status = dvc(repo, tmp, "status", f"profiles/{name}/dvc.yaml")
    return name, classes, repo, status.stdout, lists


def test_the_profile_produces_the_accuracy_table(rehearsal):
    name, classes, repo, status, _ = rehearsal
    assert "up to date" in status, status   # every stage's deps and outs are what it read and wrote
    out = repo / "results" / name
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["loss"]) for r in rows} == {(m, loss) for m in METHODS for loss in ("ce", "logit-adjusted")}
    assert all(r["seeds"] == "3" for r in rows)
    table = (out / "accuracy.md").read_text()
    assert all(f"| {m} | logit-adjusted |" in table for m in METHODS)
    metrics = json.loads((out / "metrics.json").read_text())[name]
    assert set(metrics) == set(METHODS)
    assert (out / "per_class_accuracy.png").stat().st_size > 0
    # classifier-balancing's rule on the fixture's counts (101, 100, 20, 19, 5): many > 100, few < 20
    with open(out / "per_class.csv") as f:
        groups = {r["class_name"]: r["group"] for r in csv.DictReader(f)}
    assert groups == dict(zip(classes, ("many", "medium", "medium", "few", "few")))
    hparams = json.loads((out / "hparams.json").read_text())
    assert {k for k in hparams} == {f"{m}/logit-adjusted" for m in METHODS}


def test_every_method_generated_the_medium_and_few_classes_from_their_training_images(rehearsal):
    name, classes, repo, _, lists = rehearsal
    train = {(p.split("/")[1], p.split("/")[-1]) for p, _ in lists["train"]}
    lt = repo / "data" / "longtail" / name
    with open(lt / "synthesis.csv") as f:
        rows = list(csv.DictReader(f))
    rare = [c for c, n in zip(classes, TRAIN) if n <= 100]
    for method in ("sd", "seedselect", "nao-seedselect", "dct"):
        mine = [r for r in rows if r["method"] == method]
        assert sorted(r["class_name"] for r in mine) == sorted(rare * M), method
        for r in mine:
            assert (repo / r["path"]).is_file()   # relative to the repo root, or absolute (then `/` keeps it)
            # references: the class's own training images, found in the source tree (Places365:
            # data_256/<letter>/<class, '-' nested>/), never its val images
            assert all((r["class_name"], Path(ref).name) in train for ref in r["refs"].split(";")), r["refs"]
            assert all(Path(ref).as_posix().split("/source-images/")[1] in
                       (f"train/{r['class_name']}/{Path(ref).name}",
                        f"data_256/{r['class_name'][0]}/{r['class_name'].replace('-', '/')}/{Path(ref).name}")
                       for ref in r["refs"].split(";")), r["refs"]
    # the bar: M unlisted training images of each rare class, never a listed one
    listed = {(p.split("/")[1], p.split("/")[-1]) for s in lists for p, _ in lists[s]}
    held = {d.name: sorted(p.name for p in d.iterdir()) for d in (lt / "heldout").iterdir() if d.is_dir()}
    assert sorted(held) == sorted(rare) and all(len(v) == M and (c, v[0]) not in listed for c, v in held.items())
    # each trained classifier saw the real set plus M images of each rare class
    configs = [json.loads(p.read_text()) for p in (lt / "runs").glob("dct-ce-*/seed0/config.json")]
    assert len(configs) == 1 and configs[0]["train_images"] == sum(TRAIN) + M * len(rare)
