"""The stages end to end on the digits benchmark: download (through the same prepare/integrity path,
from a local parquet dataset) -> episodes -> synthesize (augmentation generator) -> features
(base-class training of a tiny timm model) -> evaluate -> report; then a rerun that redoes nothing."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fewshot_digits import single_torch_thread, augment_generator, copy_generator, digits_spec, write_digits_source

from benchmarks.fewshot.registry import register_benchmark
from benchmarks.fewshot.reports import read_accuracy_csv
from benchmarks.fewshot.stages import BackboneParams, FewShotParams, main
from benchmarks.fewshot.synthesis import register_generator
from benchmarks.params import load_section


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    src = write_digits_source(root / "src")
    register_benchmark("digits", lambda: digits_spec("unset"), overwrite=True)
    register_generator("augment", augment_generator, overwrite=True)
    register_generator("copy", copy_generator, overwrite=True)
    params = {"fewshot": {
        "benchmarks": ["digits"], "dataset_ids": {"digits": str(src)},
        "data_dir": str(root / "data"), "results_dir": str(root / "results"),
        "hf_cache_dir": str(root / "hf"), "combined_table": str(root / "results" / "fewshot.md"),
        "seed": 3, "ways": 3, "shots": [1, 5], "queries": 15, "trials": 2, "val_episodes": 8, "test_episodes": 30,
        "progress": False,
        "backbone": {"name": "test_resnet", "image_size": 32, "epochs": 2, "batch_size": 32, "lr": 0.05,
                     "num_workers": 1, "replicates": 2},
        "synthesis": {"methods": ["augment", "copy"], "images_per_support": 2},
        "evaluate": {"heads": ["prototype", "linear"], "linear_l2": [0.01, 1.0], "linear_max_iter": 30,
                     "finetune": True, "finetune_episodes": 1, "finetune_steps": 1, "bootstrap": 200},
    }}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    main(["all", "--params", str(root / "params.yaml")])
    return root


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in (root / "data").rglob("*") if p.is_file() and "config" not in p.parts}


@pytest.mark.parametrize("params", ["profiles/paper/params.yaml"])
def test_params_section_is_typed(params):
    p = load_section(FewShotParams, "fewshot", Path(__file__).parents[1] / params)
    assert isinstance(p.backbone, BackboneParams) and all(isinstance(k, int) for k in p.shots)
    assert p.methods[0] == "real-only" and p.methods.count("real-only") == 1


def test_end_to_end_outputs(project):
    d, r = project / "data" / "digits", project / "results" / "digits"
    assert json.loads((d / "dataset" / "integrity.json").read_text())["images"] == 240
    rows = read_accuracy_csv(r / "accuracy.csv")
    combos = {(x["method"], x["head"], x["shot"]) for x in rows}
    assert combos == {(m, h, k) for m in ("real-only", "augment", "copy") for h in ("prototype", "linear", "finetune")
                      for k in (1, 5)}
    assert all(x["episodes"] == (1 if x["head"] == "finetune" else 30) and x["replicates"] == 2 for x in rows)
    proto5 = next(x for x in rows if x == {**x, "method": "real-only", "head": "prototype", "shot": 5})
    assert proto5["mean"] > 0.5  # 3-way digits: chance is 1/3
    assert proto5["gain"] is None and all(x["gain"] is not None for x in rows if x["method"] != "real-only")
    saved = json.loads((r / "episodes.json").read_text())
    per_episode = np.asarray(saved["accuracy"]["real-only/prototype/5shot"])
    assert per_episode.shape == (2, 30) and abs(per_episode.mean() - proto5["mean"]) < 1e-5
    # replicates: two backbones with their own seeds, files and features, giving different accuracies
    assert len(set(saved["backbones"])) == 2 and len(list((d / "backbone").glob("*.safetensors"))) == 2
    assert len(list((d / "features").iterdir())) == 2 and not np.array_equal(per_episode[0], per_episode[1])
    hp = json.loads((r / "hparams.json").read_text())["augment/linear/1shot"]
    assert len(hp) == 2 and hp[0]["selected"]["l2"] in (0.01, 1.0) and len(hp[0]["validation"]) == 2
    assert len(list((d / "synthetic" / "augment").rglob("*.png"))) == 3 * 2 * 2 * 2  # classes x shots x trials x M
    # 1-shot copies of the support image add nothing a prototype can use: same accuracy per episode
    acc = saved["accuracy"]
    assert acc["copy/prototype/1shot"] == acc["real-only/prototype/1shot"]
    # ... so its gain, paired by episode and replicate, is exactly 0 with a zero-width interval
    copy1 = next(x for x in rows if x == {**x, "method": "copy", "head": "prototype", "shot": 1})
    assert copy1["gain"] == 0 and copy1["gain_ci95"] == 0 and copy1["ci95"] > 0
    md = (r / "accuracy.md").read_text()
    assert "| real-only |" in md and "trained from scratch on the base (meta-train) classes, 2 epochs, 2 time(s)" in md
    assert "± = 95% interval over 2 backbone replicate(s)" in md
    assert json.loads((r / "metrics.json").read_text())["digits"]["prototype"]["augment"]["1shot"]["episodes"] == 30
    assert (r / "accuracy_vs_shots.png").is_file() and (r / "samples" / "augment" / "seven.png").is_file()
    assert "digits — linear head" in (project / "results" / "fewshot.md").read_text()
    assert (d / "config" / "features.json").is_file()


def test_synthetic_features_belong_to_their_support_set(project):
    """Each (class, shot, trial)'s synthetic features are the features of that support set's images
    (the copy generator reproduces them), so no image lands on another class or trial."""
    import torch

    from benchmarks.fewshot.sampling import read_supports
    from benchmarks.fewshot.stages import Run, _backbone, _features

    run = Run(load_section(FewShotParams, "fewshot", project / "params.yaml"), "digits")
    table, synth = _features(run, _backbone(run, 1))
    supports = read_supports(run.dir / "supports.csv")
    tested = 0
    for s in supports:
        if s.split != "test":
            continue
        copies = synth["copy"][s.key]
        expected = table[torch.tensor([s.rows[j % s.shot] for j in range(2)])]
        assert torch.allclose(copies, expected, atol=1e-4), s.key
        tested += 1
    assert tested == 3 * 2 * 2


def test_rerun_redoes_nothing_and_is_deterministic(project):
    before = _mtimes(project)
    episodes = (project / "data" / "digits" / "episodes" / "test-3way-5shot-15q.json").read_text()
    main(["all", "--params", str(project / "params.yaml")])
    assert _mtimes(project) == before  # dataset, episodes, images, backbone, features: all reused
    assert (project / "data" / "digits" / "episodes" / "test-3way-5shot-15q.json").read_text() == episodes


def test_damaged_backbone_features_and_images_are_redone(project, caplog):
    """Truncated / emptied / overwritten stage outputs are named in a warning and made again, the same."""
    import hashlib

    d = project / "data" / "digits"
    backbone = next((d / "backbone").glob("*.safetensors"))
    features = next((d / "features").rglob("synthetic-augment.safetensors"))
    image = sorted((d / "synthetic" / "augment").rglob("*.png"))[3]
    victims = {backbone: b"", features: features.read_bytes()[:100], image: b"\x89PNG garbage"}
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in victims}
    accuracy = (project / "results" / "digits" / "accuracy.csv").read_text()
    for p, data in victims.items():
        p.write_bytes(data)
    main(["all", "--params", str(project / "params.yaml")])
    for p in victims:
        assert any(p.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), p
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest[p], f"{p.name} not redone identically"
    assert (project / "results" / "digits" / "accuracy.csv").read_text() == accuracy
