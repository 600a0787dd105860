"""A rehearsal of `make paper`: `dvc repro profiles/paper/dvc.yaml` in a copy of the repository with
only the model and dataset ids swapped (to a tiny random SD and a tiny CLIP built from configs, and
to local parquet stand-ins in each hub dataset's schema with every class of the benchmark, 20
images each, tests/hub_fixtures.py) and the sizes that must shrink for 2 CPU cores (shots, trials,
episodes, epochs, images per support, denoising steps, backbone). Everything else, the stage graph,
the methods, the preset, the DCT guide kind, the benchmark specs, is the paper profile's own; the
specs' exact image counts are facts of the hub ids and are checked only for them (the full-size
counts are tested in test_benchmarks_fewshot_data.py). It proves the GPU path gets from download to
the accuracy tables (the missing SeedSelect image encoder stopped it at the first synthesis step)."""
import csv
from pathlib import Path

import pytest
import yaml
from hub_fixtures import SMALL, WRITERS
from rehearsal import copy_repository, dvc, shrink_methods, swap_ids, tiny_models

PARAMS = "profiles/paper/params.yaml"
DATASET_IDS = {"cub": "bentrevett/caltech-ucsd-birds-200-2011", "miniimagenet": "timm/mini-imagenet",
               "cifar-fs": "uoft-cs/cifar100"}
METHODS = ["real-only", "sd", "seedselect", "nao-seedselect", "dct"]


def rehearsal_params(text: str, swap: dict[str, str], scratch: Path) -> str:
    """The paper params with every hub id in ``swap`` replaced (each must be named there: the ids are
    settings of the profile) and the sizes shrunk for 2 CPU cores."""
    p = yaml.safe_load(swap_ids(text, swap, PARAMS))
    f = p["fewshot"]
    f.update(shots=[5], trials=1, val_episodes=2, test_episodes=3, progress=False, hf_cache_dir=str(scratch / "hf"))
    f["backbone"].update(name="test_resnet", image_size=16, epochs=1, batch_size=512, feature_batch_size=1024,
                         num_workers=0, device="cpu")
    s = f["synthesis"]
    s["images_per_support"] = 1
    s["settings"]["device"] = "cpu"
    shrink_methods(s["settings"]["methods"])
    f["evaluate"].update(linear_l2=[0.1], linear_max_iter=10)
    return yaml.safe_dump(p, sort_keys=False)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    repo = copy_repository(tmp / "repo")
    swap = tiny_models(tmp / "models")
    swap |= {hub_id: str(WRITERS[name](tmp / "hub" / name, **SMALL[name])) for name, hub_id in DATASET_IDS.items()}
    params = repo / PARAMS
    params.write_text(rehearsal_params(params.read_text(), swap, tmp))
    run = dvc(repo, tmp, "repro", PARAMS.replace("params.yaml", "dvc.yaml"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return repo


@pytest.mark.parametrize("benchmark", list(DATASET_IDS))
def test_make_paper_produces_the_accuracy_tables(rehearsal, benchmark):
    with open(rehearsal / "results" / benchmark / "accuracy.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["method"], r["head"]) for r in rows} == {(m, h) for m in METHODS for h in ("prototype", "linear")}
    assert all(r["shot"] == "5" and r["episodes"] == "3" for r in rows)
    assert (rehearsal / "results" / benchmark / "accuracy.md").is_file()
    manifest = (rehearsal / "data" / "fewshot" / benchmark / "synthesis.csv").read_text()
    assert all(f",{m}," in manifest for m in METHODS[1:])


def test_the_combined_table_names_every_method(rehearsal):
    table = (rehearsal / "results" / "fewshot.md").read_text()
    assert all(m in table for m in METHODS)


def test_dct_was_guided_by_zero_shot_clip_over_the_test_classes(rehearsal):
    from benchmarks.fewshot.registry import get_benchmark

    spec = get_benchmark("miniimagenet")
    labels = (rehearsal / "data" / "fewshot" / "miniimagenet" / "class-labels.txt").read_text().splitlines()
    assert labels == sorted(spec.display_name(c) for c in spec.classes["test"])
    from pipelines.dct import DctToken

    tokens = list((rehearsal / "data" / "fewshot" / "miniimagenet" / "generation-cache").glob("dct-*.safetensors"))
    assert len(tokens) == len(spec.classes["test"])
    assert all(DctToken.load(t).record["classifier"].startswith("clip-zeroshot:") for t in tokens)


def test_the_integrity_record_says_the_hub_counts_were_not_checked(rehearsal):
    import json

    for name, hub_id in DATASET_IDS.items():
        record = json.loads((rehearsal / "data" / "fewshot" / name / "dataset" / "integrity.json").read_text())
        assert record["exact_counts"].startswith(f"not checked: the source is not {hub_id}")


def test_cifar_label_cra_became_crab(rehearsal):
    import datasets

    names = set(datasets.load_from_disk(str(rehearsal / "data" / "fewshot" / "cifar-fs" / "dataset"))["class_name"])
    assert "crab" in names and "cra" not in names
