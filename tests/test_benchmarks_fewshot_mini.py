"""The offline benchmark `mini-digits` end to end on tiny models: a mini world data folder (built by
benchmarks.mini.data from scikit-learn's digits) -> source + DCT guide (benchmarks.fewshot.mini) ->
download (prepare + integrity from the local parquet) -> episodes -> synthesis through the REAL
pipelines (sd, seedselect, nao-seedselect, dct via generate_concept on save_tiny_pipeline models)
-> features -> evaluate -> report; then resumability."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fewshot_digits import single_torch_thread  # noqa: F401  (autouse fixture)

from benchmarks.fewshot import mini, stages
from benchmarks.fewshot.data import DatasetIntegrityError
from benchmarks.fewshot.reports import read_accuracy_csv
from benchmarks.fewshot.synthesis import read_manifest
from benchmarks.mini.config import DataConfig
from benchmarks.mini.data import build
from pipelines.testing import save_tiny_image_encoder, save_tiny_pipeline

METHODS = ("sd", "seedselect", "nao-seedselect", "dct")
VARIANT = "seedselect-per-concept"
TEST_CLASSES = ("two", "five")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("minifewshot")
    build(DataConfig(source="sklearn_digits", image_size=32, tail_classes=[2, 5], n_train_tail=2, n_train_head=12,
                     n_test=6, n_references=1, n_encoder=10, n_evaluator=1), root / "mini" / "data")
    save_tiny_pipeline(root / "mini" / "sd")
    save_tiny_image_encoder(root / "mini" / "clip")
    src = root / "fewshot" / "mini-digits-source"
    params = {
        "mini_fewshot": {
            "mini_data": str(root / "mini" / "data"), "out_dir": str(src),
            "classes": {"train": ["zero", "one", "three"], "val": ["six", "seven"], "test": list(TEST_CLASSES)},
            "min_images_per_class": 5, "guide_dir": str(root / "fewshot" / "guide"),
            "guide": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                      "steps": 3, "batch_size": 16}},
        "fewshot": {
            "benchmarks": [str(src / "spec.json")], "data_dir": str(root / "fewshot"),
            "results_dir": str(root / "results"), "hf_cache_dir": str(root / "hf"),
            "combined_table": str(root / "results" / "fewshot.md"), "progress": False,
            "seed": 0, "ways": 2, "shots": [1, 2], "queries": 3, "trials": 1, "val_episodes": 4, "test_episodes": 6,
            "backbone": {"name": "test_resnet", "image_size": 32, "epochs": 1, "batch_size": 16, "device": "cpu",
                         "replicates": 1},
            "synthesis": {"methods": list(METHODS) + [VARIANT], "images_per_support": 2, "prompt_template": "{}",
                          "variants": {VARIANT: {"method": "seedselect", "semantic_loss": "per_concept"}},
                          "settings": {"preset": "fast", "model": str(root / "mini" / "sd"),
                                       "image_encoder": str(root / "mini" / "clip"), "device": "cpu", "methods": {
                                           "sd": {"num_inference_steps": 2},
                                           "seedselect": {"num_inference_steps": 3, "iterations": 1,
                                                          "bootstrap_iterations": 1},
                                           "nao-seedselect": {"num_inference_steps": 3, "iterations": 1,
                                                              "inversion_steps": 2, "n_points": 4},
                                           "dct": {"num_inference_steps": 2, "max_epochs": 1, "epoch_size": 1,
                                                   "min_correct": 1, "patience": 1,
                                                   "classifier": str(root / "fewshot" / "guide")}}}},
            "evaluate": {"heads": ["prototype", "linear"], "linear_l2": [0.1], "linear_max_iter": 10}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("source", "guide"):
        mini.main([stage, "--params", str(root / "params.yaml")])
    stages.main(["all", "--params", str(root / "params.yaml")])
    return root


def test_recipe_report_scores_each_variant_with_the_evaluator(project, tmp_path):
    from benchmarks.fewshot import recipe
    from benchmarks.fewshot.reports import read_accuracy_csv
    from benchmarks.mini.config import EvaluatorConfig, MiniConfig
    from benchmarks.mini.evaluator import train

    train(MiniConfig(root=str(project / "mini"), data=DataConfig(source="sklearn_digits", image_size=32),
                     evaluator=EvaluatorConfig(steps=3, batch_size=8)))
    params = yaml.safe_load((project / "params.yaml").read_text())
    rows = {"SeedSelect, contrastive + bootstrap": "seedselect", "SeedSelect, per-concept + bootstrap": VARIANT}
    params["fewshot_recipe"] = {"benchmark": params["fewshot"]["benchmarks"][0],
                                "evaluator": str(project / "mini" / "evaluator"),
                                "mini_data": str(project / "mini" / "data"), "tail_classes": list(TEST_CLASSES),
                                "head": "linear", "rows": rows}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert recipe.main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = json.loads((project / "results" / "mini-digits" / "recipe.json").read_text())
    accuracy = {(r["method"], r["shot"]): r for r in read_accuracy_csv(project / "results" / "mini-digits" / "accuracy.csv")
                if r["head"] == "linear"}
    for variant in rows.values():
        v = out["variants"][variant]
        assert v["groups"] == 2 and v["images"] == 8 and 0 <= v["tail_fidelity"][0] <= 1
        assert 0 <= v["near_copy_share"][0] <= 1 and v["updates_per_image"] >= 1 and v["seconds_per_image"] > 0
        for shot in (1, 2):   # the evaluate stage's paired gains, carried over as they are
            gain, ci = v["gain_over_real_only"][str(shot)]
            assert gain == accuracy[variant, shot]["gain"]
            assert ci == accuracy[variant, shot]["gain_ci95"] or (math.isnan(ci) and math.isnan(accuracy[variant, shot]["gain_ci95"]))
    md = (project / "results" / "mini-digits" / "recipe.md").read_text()
    assert all(f"| {label} |" in md for label in rows)
    params["fewshot_recipe"]["rows"] = {"missing": "seedselect-no-bootstrap"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="no synthetic images of 'seedselect-no-bootstrap'"):
        recipe.main(["--params", str(tmp_path / "params.yaml")])


def test_seedselect_contrasts_the_test_classes_and_a_variant_does_not(project):
    d = project / "fewshot" / "mini-digits"
    manifest = read_manifest(d / "synthesis.csv")
    records = {}
    for path in (d / "generation-runs").glob("seedselect-*/*/seedselect-*-00000.json"):
        rec = json.loads(path.read_text())
        records.setdefault(rec["settings"]["semantic_loss"], []).append(rec)
    # one contrast set per (shot, trial): both test classes, prompts as the method's template makes them
    contrastive = records["contrastive"]
    assert len(contrastive) == 2 * 2 and all(sorted(c["prompt"] for c in r["contrast_set"]) == sorted(TEST_CLASSES)
                                             for r in contrastive)
    assert len(records["per_concept"]) == 4 and all("contrast_set" not in r for r in records["per_concept"])
    # same supports, seeds and budget; the loss alone differs, and so do the images
    a = sorted(r.path for r in manifest if r.method == "seedselect")
    b = sorted(r.path for r in manifest if r.method == VARIANT)
    assert len(a) == len(b) == 8
    assert any(Path(x).read_bytes() != Path(y).read_bytes() for x, y in zip(a, b))


def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "config" not in p.parts}


def test_source_spec_goes_through_prepare_and_integrity(project):
    spec = json.loads((project / "fewshot" / "mini-digits-source" / "spec.json").read_text())
    assert spec["name"] == "mini-digits" and spec["classes"]["test"] == list(TEST_CLASSES)
    # base digits come from the mini SD's long-tailed training split (zero, one, three: the profile's 12, 9,
    # 7 of 12 -> 2 over 7 levels, the validation digit seven sharing the floor with the tail), novel ones from
    # its held-out split (6 each)
    assert spec["images_per_split"] == {"train": 28, "val": 12, "test": 12}
    integrity = json.loads((project / "fewshot" / "mini-digits" / "dataset" / "integrity.json").read_text())
    assert integrity["images"] == 52
    guide = json.loads((project / "fewshot" / "guide" / "config.json").read_text())
    assert guide["id2label"]["2"] == "two" and guide["num_hidden_layers"] == 1


def test_accuracy_table_and_outputs(project):
    rows = read_accuracy_csv(project / "results" / "mini-digits" / "accuracy.csv")
    combos = {(r["method"], r["head"], r["shot"]) for r in rows}
    expected = {(m, h, k) for m in ("real-only",) + METHODS + (VARIANT,) for h in ("prototype", "linear") for k in (1, 2)}
    # NAO-SeedSelect interpolates between >= 2 reference seeds: no 1-shot row rather than a fake one
    assert combos == expected - {("nao-seedselect", h, 1) for h in ("prototype", "linear")}
    assert all(r["episodes"] == 6 and 0 <= r["mean"] <= 1 for r in rows)
    md = (project / "results" / "mini-digits" / "accuracy.md").read_text()
    assert "| nao-seedselect | – |" in md
    manifest = read_manifest(project / "fewshot" / "mini-digits" / "synthesis.csv")
    per_method = {m: [r for r in manifest if r.method == m] for m in METHODS}
    assert {m: len(v) for m, v in per_method.items()} == {"sd": 8, "seedselect": 8, "nao-seedselect": 4, "dct": 8}
    assert all(Path(r.path).is_file() for r in manifest)
    assert {r.class_name for r in manifest} == set(TEST_CLASSES)
    # DCT trained one class token per class against the guide, reused across support sets
    tokens = list((project / "fewshot" / "mini-digits" / "generation-cache").rglob("*.safetensors"))
    assert tokens and (project / "results" / "mini-digits" / "samples" / "dct" / "two.png").is_file()


def test_rerun_resumes_and_skips_finished_work(project):
    d = project / "fewshot" / "mini-digits"
    manifest = read_manifest(d / "synthesis.csv")
    victim = next(Path(r.path) for r in manifest if r.method == "seedselect" and r.shot == 2)
    victim.unlink()
    before = _files(d)
    stages.main(["all", "--params", str(project / "params.yaml")])
    after = _files(d)
    assert victim.is_file()  # the missing image was made again ...
    changed = sorted(str(p) for p in before if after.get(p) != before[p])
    # ... and nothing else was redone except the features of the method whose image changed
    assert all("synthetic-seedselect" in c for c in changed), changed


def test_stale_source_is_caught_by_the_integrity_check(project, tmp_path):
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["mini_fewshot"]["classes"]["test"] = ["two", "five", "nine"]
    p["mini_fewshot"]["classes"]["train"] = ["zero", "one"]
    p["mini_fewshot"]["classes"]["val"] = ["three", "six"]
    p["mini_fewshot"]["out_dir"] = str(tmp_path / "src")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    mini.main(["source", "--params", str(tmp_path / "params.yaml")])
    # the prepared dataset of the old split no longer matches the new spec: a clear error, no silent reuse
    fs = dict(p["fewshot"], benchmarks=[str(tmp_path / "src" / "spec.json")])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**p, "fewshot": fs}))
    with pytest.raises(DatasetIntegrityError, match="delete that directory"):
        stages.main(["download", "--params", str(tmp_path / "params.yaml")])


def test_backbone_training_is_reproducible(project):
    """The base-class backbone is a function of the seed: retrained from scratch, same weights."""
    from safetensors.torch import load_file

    backbone = project / "fewshot" / "mini-digits" / "backbone"
    (path,) = backbone.glob("*.safetensors")
    first = load_file(str(path))
    path.unlink()
    stages.main(["features", "--params", str(project / "params.yaml")])
    second = load_file(str(path))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
