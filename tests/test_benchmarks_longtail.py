"""Long-tail benchmarks: shipped lists, the ImageNet-LT data stage on a fixture laid out like
ILSVRC2012 (tests/longtail_fixtures.py), the shot-group rule, the logit-adjusted loss, the synthesis
selection rule, a tiny train -> evaluate -> report run through the CLI, and mini-lt synthesis on tiny models."""
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from benchmarks.intervals import ZERO_WIDTH_NOTE, t_interval
from benchmarks.longtail import data, evaluation, heldout, reports, stages, synthesis, training
from benchmarks.longtail.registry import (IMAGENET_LT_TRAIN_SHA256, SPLITS, get_benchmark, list_benchmarks,
                                          register_benchmark, with_train_list)
from longtail_fixtures import TRAIN, WNIDS, imagenet_lt_fixture, jpeg, places_lt_fixture, write_places_tree, write_tree


@pytest.fixture
def fixture(tmp_path):
    """A five-class ImageNet-LT: the real spec with fixture lists (train by URL, as downloaded)."""
    return imagenet_lt_fixture(tmp_path)


# --- registry and shipped lists ------------------------------------------------------------------

def test_registry_specs_match_the_published_sizes():
    assert {"imagenet-lt", "places-lt"} <= set(list_benchmarks())
    inet, places = get_benchmark("imagenet-lt"), get_benchmark("places-lt")
    assert (len(inet.classes), inet.images_per_split, inet.images_per_class) == (
        1000, {"train": 115_846, "val": 20_000, "test": 50_000}, {"val": 20, "test": 50})
    assert inet.classes[0] == "n01440764" and inet.display_name("n01440764") == "tench"
    assert inet.lists["train"].sha256 == IMAGENET_LT_TRAIN_SHA256 and inet.lists["train"].size == 4_658_674
    assert "1Sl1cwy6Dei1I1BMS1YKjI35fkaR1UA_7" in inet.lists["train"].url
    assert (len(places.classes), places.images_per_split, places.images_per_class) == (
        365, {"train": 62_500, "val": 7_300, "test": 36_500}, {"val": 20, "test": 100})
    assert places.display_name("arena-hockey") == "arena hockey"


def test_shipped_lists_are_the_published_bytes_and_declared_package_data():
    import gzip
    import tomllib
    from importlib import resources
    from pathlib import Path

    expected = {"imagenet_lt/ImageNet_LT_val.txt.gz": "9af7ba688acf9532ff5845a8fb14a1e97fdc4c51ac48bc72c08ea9c3f7ff142e",
                "imagenet_lt/ImageNet_LT_test.txt.gz": "d1590191cf8a71fada7b1aaedaa2d139a2aea93ff2f1b755319d0bd8dbaa55d5",
                "places_lt/Places_LT_train.txt.gz": "726c4871dcbf07ce2f857703bfe32e9a83ffbf52d704239f6d95c4f4f4c247f7",
                "places_lt/Places_LT_val.txt.gz": "719e3cf3766c09134ea28f56f1036c78def511ac1ed2c2532a6beef78f2439ba",
                "places_lt/Places_LT_test.txt.gz": "44eee8441c8098c59195465abede425721bc35525d75209f9433b161a6eb37bc"}
    root = resources.files("benchmarks.longtail").joinpath("lists")
    got = {n: hashlib.sha256(gzip.decompress(root.joinpath(*n.split("/")).read_bytes())).hexdigest() for n in expected}
    assert got == expected
    sources = root.joinpath("SOURCES.md").read_text()
    assert all(sha in sources for sha in expected.values()) and IMAGENET_LT_TRAIN_SHA256 in sources
    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "lists/*/*.txt.gz" in cfg["tool"]["setuptools"]["package-data"]["benchmarks.longtail"]


def test_shipped_lists_pass_the_spec_checks():
    """Counts per split and class, and each path's class folder against its label's class."""
    for name, splits in (("imagenet-lt", ("val", "test")), ("places-lt", SPLITS)):
        spec = get_benchmark(name)
        for s in splits:
            entries = data.parse_list(data.list_bytes(spec.lists[s]).decode(), s)
            assert sum(data.check_entries(spec, s, entries).values()) == spec.images_per_split[s]
    inet = get_benchmark("imagenet-lt")
    entries = data.parse_list(data.list_bytes(inet.lists["val"]).decode(), "val")
    with pytest.raises(data.DatasetIntegrityError, match="label 1 is class 'n01443537', not the folder 'n01440764'"):
        data.check_entries(inet, "val", [(p, 1 if k == 0 else y) for k, (p, y) in enumerate(entries)])


# --- the data stage on an ILSVRC2012-like fixture ------------------------------------------------

@pytest.mark.parametrize("as_tars", [False, True], ids=["folder-tree", "official-tars"])
def test_data_stage_selects_listed_images_by_file_name(fixture, tmp_path, as_tars):
    spec, lists, files = fixture
    root = write_tree(tmp_path / "ILSVRC2012", lists, as_tars)
    # an image of the source that no list names must not enter any split
    (root / "train" / WNIDS[0]).mkdir(parents=True, exist_ok=True)
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_99999.JPEG").write_bytes(jpeg(0, 0))
    out = data.prepare(spec, root, tmp_path / "D" / "prepared", cache_dir=tmp_path / "D" / "lists", progress=False)
    splits = data.load_prepared(spec, out)
    for s in SPLITS:
        assert [p.split("/")[-1] for p in splits[s].paths] == [p.split("/")[-1] for p, _ in lists[s]]
        assert splits[s].labels.tolist() == [y for _, y in lists[s]]
    assert data.class_counts(splits["train"], len(WNIDS)).tolist() == list(TRAIN)
    assert (tmp_path / "D" / "lists" / "ImageNet_LT_train.txt").read_bytes() == files["train"].read_bytes()
    with Image.open(splits["test"].paths[0]) as im:
        assert im.size == (12, 12)
    assert (tmp_path / "D" / "images").is_dir() == as_tars  # tars are extracted, folders are read in place
    record = json.loads((out / "integrity.json").read_text())
    assert record["spec"]["lists"]["train"]["sha256"] == spec.lists["train"].sha256 and record["images"]["train"] == sum(TRAIN)
    stamp = (out / "integrity.json").stat().st_mtime_ns
    data.prepare(spec, tmp_path / "nowhere", out)  # done: returns before looking for images
    assert (out / "integrity.json").stat().st_mtime_ns == stamp


def test_places_images_are_found_by_class_folder_and_file_name(tmp_path):
    """Places365 train files are numbered per class (00000001.jpg in every class): the class folder
    decides, also when data_256 nests a sub-category (arena/hockey = arena-hockey)."""
    spec = get_benchmark("places-lt")
    assert data.entry_key(spec, "train/arena-hockey/00000001.jpg") == "arena-hockey/00000001.jpg"
    assert data.entry_key(spec, "val/airfield/Places365_val_00003597.jpg") == "Places365_val_00003597.jpg"
    assert "arena-hockey/00000001.jpg" in data.source_keys(spec, ["data_256", "a", "arena", "hockey", "00000001.jpg"])
    assert data.source_keys(spec, ["val_256", "Places365_val_00003597.jpg"]) == ["Places365_val_00003597.jpg"]
    entries = {"train": [("train/arena-hockey/00000001.jpg", 0), ("train/airfield/00000001.jpg", 1)],
               "val": [], "test": [("val/airfield/Places365_val_00003597.jpg", 1)]}
    for rel in ("data_256/a/arena/hockey/00000001.jpg", "data_256/a/airfield/00000001.jpg",
                "data_256/a/airfield/00000002.jpg", "val_256/Places365_val_00003597.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    found = data.find_images(spec, entries, tmp_path, tmp_path / "extracted", progress=False)
    assert {k: v.read_text() for k, v in found.items()} == {
        "arena-hockey/00000001.jpg": "data_256/a/arena/hockey/00000001.jpg",
        "airfield/00000001.jpg": "data_256/a/airfield/00000001.jpg",
        "Places365_val_00003597.jpg": "val_256/Places365_val_00003597.jpg"}


def test_heldout_images_are_unlisted_training_images_chosen_alike_from_a_tree_and_tars(fixture, tmp_path):
    """The real-heldout bar's images: training images of the wanted classes that no list names (never
    a validation image), the same M from the folder tree and the official tars, a larger M keeping the
    smaller one's choice; too few is an error naming the class, and nothing is written."""
    spec, lists, _ = fixture
    wanted = {WNIDS[2]: 3, WNIDS[4]: 3}
    tree = heldout.choose(spec, lists, write_tree(tmp_path / "tree", lists, unlisted=5), wanted, seed=0)
    tars = heldout.choose(spec, lists, write_tree(tmp_path / "tars", lists, as_tars=True, unlisted=5), wanted, seed=0)
    keys = {c: [k for k, _ in items] for c, items in tree.items()}
    assert keys == {c: [k for k, _ in items] for c, items in tars.items()}
    listed = {p.split("/")[-1] for s in SPLITS for p, _ in lists[s]}
    assert all(len(ks) == 3 and all(k.startswith(f"{c}_9000") and k not in listed for k in ks) for c, ks in keys.items())
    assert all(path.read_bytes() == payload for c in wanted for (_, path), (_, payload) in zip(tree[c], tars[c]))
    more = heldout.choose(spec, lists, tmp_path / "tree", {c: 4 for c in wanted}, seed=0)
    assert all(set(keys[c]) < {k for k, _ in more[c]} for c in wanted)
    assert heldout.choose(spec, lists, tmp_path / "tree", wanted, seed=1) != tree   # the seed keys the choice
    out = tmp_path / "heldout"
    got = heldout.write_heldout(spec, lists, tmp_path / "tars", wanted, 0, out)
    assert got == keys and sorted(p.name for p in (out / WNIDS[2]).iterdir()) == keys[WNIDS[2]]
    with pytest.raises(ValueError, match=f"class {WNIDS[4]} has 5 training images outside the lists"):
        heldout.write_heldout(spec, lists, tmp_path / "tree", {WNIDS[4]: 6}, 0, out)
    assert sorted(p.name for p in (out / WNIDS[2]).iterdir()) == keys[WNIDS[2]]   # the finished folder stands


def test_places_heldout_images_come_from_their_class_folder(tmp_path):
    """Places365 training files are numbered per class: a held-out image is keyed by its class folder,
    also a nested sub-category (arena/hockey = arena-hockey), and no validation image is one."""
    spec, lists, _ = places_lt_fixture(tmp_path / "fixture")
    root = write_places_tree(tmp_path / "places365", lists, unlisted=2)
    chosen = heldout.choose(spec, lists, root, {"arena-hockey": 2, "alley": 2}, seed=0)
    assert {c: [k for k, _ in items] for c, items in chosen.items()} == {
        "arena-hockey": ["arena-hockey/00090000.jpg", "arena-hockey/00090001.jpg"],
        "alley": ["alley/00090000.jpg", "alley/00090001.jpg"]}
    assert all(p.parts[-3:-1] == ("arena", "hockey") for _, p in chosen["arena-hockey"])


def test_a_missing_image_is_an_error_that_names_it(fixture, tmp_path):
    spec, lists, _ = fixture
    root = write_tree(tmp_path / "ILSVRC2012", lists)
    (root / "val" / "ILSVRC2012_val_00000297.JPEG").unlink()
    with pytest.raises(data.MissingImageError, match=r"image val/n01443537/ILSVRC2012_val_00000297.JPEG \(test list\) not found"):
        data.prepare(spec, root, tmp_path / "prepared", progress=False)
    assert not (tmp_path / "prepared").exists()
    (root / "val" / "ILSVRC2012_val_00000297.JPEG").write_bytes(jpeg(1, 0)[:30])  # back, but truncated
    with pytest.raises(data.DatasetIntegrityError, match=r"1 images do not decode, e.g. .*ILSVRC2012_val_00000297.JPEG"):
        data.prepare(spec, root, tmp_path / "prepared", progress=False)
    assert not (tmp_path / "prepared").exists()


def test_wrong_checksum_train_list_is_refused(fixture, tmp_path):
    """A local copy and a download are held to the same size and sha256; nothing wrong is cached."""
    real = get_benchmark("imagenet-lt")
    bad = tmp_path / "ImageNet_LT_train.txt"
    bad.write_bytes(b"train/n01440764/n01440764_10026.JPEG 0\n")
    with pytest.raises(data.ListChecksumError, match=r"39 bytes with sha256 [0-9a-f]{64}; the official ImageNet_LT_train.txt "
                                                     r"has 4,658,674 bytes, sha256 efdbdad4f050"):
        data.list_bytes(with_train_list(real, bad).lists["train"])
    spec, lists, files = fixture
    files["train"].write_bytes(files["train"].read_bytes().replace(b" 4\n", b" 3\n", 1))  # one label changed upstream
    with pytest.raises(data.ListChecksumError, match="download of file:"):
        data.list_bytes(spec.lists["train"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cli_reports_bad_input_in_one_line_with_exit_2(fixture, tmp_path, capsys):
    spec, lists, files = fixture
    register_benchmark(spec.name, spec, overwrite=True)
    bad = tmp_path / "copy.txt"
    bad.write_bytes(files["train"].read_bytes() + b"train/n01440764/n01440764_1.JPEG 0\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"longtail": {"benchmarks": [spec.name], "data_dir": str(tmp_path / "d"),
                                                   "image_roots": {spec.name: str(write_tree(tmp_path / "src", lists))},
                                                   "train_lists": {spec.name: str(bad)}, "progress": False}}))
    with pytest.raises(SystemExit) as e:
        stages.main(["data", "--params", str(params)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {bad}:") and "sha256" in err
    # no source folder for the benchmark: the data stage names the setting; the heldout stage, run
    # before it, names the stage to run
    params.write_text(yaml.safe_dump({"longtail": {"benchmarks": [spec.name], "data_dir": str(tmp_path / "d"),
                                                   "heldout": {"images_per_class": 1}, "progress": False}}))
    expected = {"data": f"error: image_roots has no entry for {spec.name!r}: give the folder holding its source images",
                "heldout": f"error: {tmp_path / 'd' / spec.name / 'prepared'}: no prepared {spec.name}; run the data stage first"}
    for stage, message in expected.items():
        with pytest.raises(SystemExit) as e:
            stages.main([stage, "--params", str(params)])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == message


def test_gpu_profiles_parse_into_the_typed_params():
    """Unknown or misspelt keys are errors; the benchmarks and data layout are the stated ones."""
    from pathlib import Path

    from benchmarks.params import load_section

    repo = Path(__file__).parents[1]
    for name in ("imagenet-lt", "places-lt"):
        p = load_section(stages.LongTailParams, "longtail", repo / "profiles" / name / "params.yaml")
        assert p.benchmarks == [name] and name in p.image_roots and len(p.seeds) >= 3
        assert set(p.losses) == set(training.LOSSES)
        dvc = yaml.safe_load((repo / "profiles" / name / "dvc.yaml").read_text())
        assert all(f"profiles/{name}/params.yaml" in st["cmd"] for st in dvc["stages"].values())
        # the rare classes get images from all four methods, and training reads them
        assert set(p.synthesis.methods) == {"sd", "seedselect", "nao-seedselect", "dct"}
        assert p.synthesis.groups == ["medium", "few"] and p.synthesis.settings["preset"] == "fast"
        assert p.synthesis.settings["methods"]["dct"]["classifier_labels"] == "benchmark-classes"
        synthetic = f"data/longtail/{name}/synthetic"
        assert any(synthetic in out for out in dvc["stages"]["longtail_synthesize"]["outs"])
        assert synthetic in dvc["stages"]["longtail_train"]["deps"]
    with pytest.raises(ValueError, match="at least 3 distinct"):
        stages.LongTailParams(seeds=[0, 1])
    with pytest.raises(KeyError, match="did you mean 'logit-adjusted'"):
        stages.LongTailParams(losses=["logit-adjust"])


# --- evaluation ----------------------------------------------------------------------------------

def test_shot_groups_follow_classifier_balancing_shot_acc():
    counts = [101, 100, 20, 19, 5]
    assert evaluation.shot_groups(counts).tolist() == ["many", "medium", "medium", "few", "few"]
    # OLTR's older rule (>= 100 many, <= 20 few) expressed through the thresholds
    assert evaluation.shot_groups(counts, many_threshold=99, few_threshold=21).tolist() == ["many", "many", "few", "few", "few"]
    labels = np.repeat(np.arange(5), 2)
    # correct per class: 2/2, 1/2, 0/2, 1/2, 2/2
    preds = np.array([0, 0, 1, 0, 4, 4, 3, 1, 4, 4])
    acc = evaluation.shot_accuracies(preds, labels, counts)
    assert acc == pytest.approx({"many": 1.0, "medium": (0.5 + 0.0) / 2, "few": (0.5 + 1.0) / 2, "overall": 6 / 10})
    # a group is the mean of its classes, not of its images: unequal test counts tell them apart
    labels2, preds2 = np.array([0, 1, 1, 1, 3, 3]), np.array([0, 1, 0, 0, 3, 3])
    assert evaluation.shot_accuracies(preds2, labels2, counts)["medium"] == pytest.approx(1 / 3)
    no_many = evaluation.shot_accuracies(preds, labels, [50, 50, 50, 5, 5])
    assert math.isnan(no_many["many"]) and no_many["medium"] == pytest.approx(0.5)


# --- the logit-adjusted loss ---------------------------------------------------------------------

def test_logit_adjusted_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    counts = torch.tensor([500.0, 120.0, 40.0, 9.0, 2.0])
    pi = (counts / counts.sum()).double()
    for tau in (0.5, 1.0, 2.0):
        adjusted = logits + tau * pi.log()
        by_hand = -(adjusted[range(7), y] - adjusted.exp().sum(1).log()).mean()
        assert training.logit_adjusted_loss(logits, y, counts, tau).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # tau = 1 is Balanced Softmax: -log(n_y e^{f_y} / sum_j n_j e^{f_j})
    weighted = counts.double() * logits.exp()
    balanced = -(weighted[range(7), y] / weighted.sum(1)).log().mean()
    assert training.logit_adjusted_loss(logits, y, counts, 1.0).item() == pytest.approx(balanced.item(), rel=1e-6)
    assert training.logit_adjusted_loss(logits, y, counts, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item())
    # it charges a head-class prediction more than cross-entropy does, a tail one less
    head, tail = torch.zeros(1, 5), torch.zeros(1, 5)
    assert training.logit_adjusted_loss(head, torch.tensor([0]), counts) < F.cross_entropy(head, torch.tensor([0]))
    assert training.logit_adjusted_loss(tail, torch.tensor([4]), counts) > F.cross_entropy(tail, torch.tensor([4]))
    with pytest.raises(ValueError, match="class 2 has none"):
        training.logit_adjusted_loss(logits, y, torch.tensor([5.0, 3.0, 0.0, 1.0, 1.0]))


def test_an_interrupted_training_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    paths = []
    for k in range(12):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(jpeg(k % 3, k))
    labels = np.arange(12) % 3
    cfg = training.TrainConfig(model="test_resnet", image_size=12, epochs=2, batch_size=4, lr=0.05, amp=False,
                               num_workers=0, device="cpu")
    torch.set_num_threads(1)
    whole = training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=3, progress=False).state_dict()

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(iterable, **_):
        class Bar:
            def __iter__(self):
                yield next(iter(iterable))
                raise Interrupted

            def set_postfix(self, **_):
                pass
        return Bar()

    state = tmp_path / "state.pt"
    with monkeypatch.context() as m:
        m.setattr(training, "tqdm", stop_after_first_epoch)
        with pytest.raises(Interrupted):
            training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=3, state_path=state, progress=False)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    resumed = training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=3, state_path=state,
                                        progress=False).state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_decode_once_gives_the_same_samples_and_opens_each_file_once(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(jpeg(i, i))
    cfg = training.TrainConfig(image_size=12, crop_scale=(0.5, 1.0), color_jitter=0.0)
    opened = []
    real_open = training.Image.open
    monkeypatch.setattr(training.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    files = [training.ImageFiles(paths, [0, 1, 2], training.transforms(cfg, train=False), decode_once=d) for d in (False, True)]
    for _ in range(2):  # two epochs
        for i in range(3):
            (a, ya), (b, yb) = files[0][i], files[1][i]
            assert torch.equal(a, b) and ya == yb
    assert len(opened) == 2 * 3 + 3   # every access without decode_once, each file once with it


def test_the_logit_adjustment_prior_can_come_from_other_counts(tmp_path, monkeypatch):
    """``prior_counts`` (the real images' counts when generated images are added) replaces the label
    counts of the training images in the loss, and only there."""
    paths = []
    for k in range(9):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(jpeg(k % 3, k))
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])
    cfg = training.TrainConfig(model="test_resnet", image_size=12, epochs=1, batch_size=4, lr=0.05, amp=False,
                               num_workers=0, device="cpu")
    torch.set_num_threads(1)
    seen = []
    real_loss_fn = training.loss_fn
    monkeypatch.setattr(training, "loss_fn", lambda name, counts, tau=1.0: seen.append(counts.tolist()) or
                        real_loss_fn(name, counts, tau))
    default = training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=0, progress=False).state_dict()
    real = training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=0, progress=False,
                                     prior_counts=np.array([5, 1, 1])).state_dict()
    assert seen == [[5, 3, 1], [5, 1, 1]]
    assert not all(torch.equal(default[k], real[k]) for k in default)  # the prior moved the weights
    with pytest.raises(ValueError, match="one count per class"):
        training.train_classifier(paths, labels, 3, cfg, "logit-adjusted", seed=0, progress=False,
                                  prior_counts=np.array([5, 1]))
    with pytest.raises(KeyError, match="unknown logit-adjustment prior"):
        stages.LongTailParams(prior=["generated"])


# --- extra images and the synthesis rule ---------------------------------------------------------

def test_gain_over_real_pairs_the_values_by_training_seed():
    """A method's gain over real-only: one difference per training seed both hold, matched by seed id,
    not by position; no shared seed (or a CSV without seed ids) gives no figure."""
    def row(method, values, seeds):
        return {"benchmark": "b", "method": method, "loss": "ce", "metric": "few", "mean": float(np.mean(values)),
                "ci95": 0.0, "seeds": len(values), "values": ";".join(map(str, values)), "seed_ids": ";".join(map(str, seeds))}

    real = row("real", [0.5, 0.2, 0.8], [0, 1, 2])
    # by seed id: +0.1 at every seed (by position it would be +0.4, +0.4, -0.5: the same mean, a wide interval)
    mean, half, n = reports.paired_gain(row("sd", [0.9, 0.6, 0.3], [2, 0, 1]), real)
    assert (mean, half, n) == (pytest.approx(0.1), 0.0, 3)
    assert reports.paired_gain(row("sd", [0.7, 0.4], [0, 1]), real)[2] == 2
    assert math.isnan(reports.paired_gain(row("sd", [0.7], [5]), real)[0])
    assert math.isnan(reports.paired_gain({**row("sd", [0.7, 0.4, 0.1], [0, 1, 2]), "seed_ids": None}, real)[0])
    table = reports.gain_table([real, row("sd", [0.9, 0.6, 0.3], [2, 0, 1])])
    assert "| sd | ce | – | – | +10.0 ± 0.0† | – |" in table and table.rstrip().endswith(ZERO_WIDTH_NOTE)
    assert reports.gain_table([real]) == ""


def test_synthesis_plan_selects_medium_and_few_classes():
    counts = {"a": 150, "b": 100, "c": 20, "d": 19, "e": 5}
    assert synthesis.synthesis_plan(counts, images_per_class=10) == {"b": 10, "c": 10, "d": 10, "e": 10}
    assert synthesis.synthesis_plan(counts, top_up_to=20) == {"d": 1, "e": 15}
    assert synthesis.synthesis_plan(counts, groups=("few",), top_up_to=50) == {"d": 31, "e": 45}
    with pytest.raises(ValueError, match="exactly one"):
        synthesis.synthesis_plan(counts, images_per_class=5, top_up_to=20)
    with pytest.raises(KeyError, match="did you mean 'medium'"):
        synthesis.synthesis_plan(counts, groups=("medum",), images_per_class=5)


def test_reference_images_come_from_the_training_split_and_are_keyed_per_class():
    train = data.Split(tuple(f"train/{i}.jpg" for i in range(30)), np.arange(30) % 3)
    refs = synthesis.reference_images(train, ["a", "b", "c"], ["b", "c"], per_class=4, seed=0, benchmark="x")
    assert set(refs) == {"b", "c"} and all(len(v) == 4 for v in refs.values())
    assert all(int(p.split("/")[1].split(".")[0]) % 3 == 1 for p in refs["b"])
    assert synthesis.reference_images(train, ["a", "b", "c"], ["c"], 4, 0, "x")["c"] == refs["c"]  # b's draw is not c's
    assert synthesis.reference_images(train, ["a", "b", "c"], ["c"], 4, 1, "x")["c"] != refs["c"]
    assert len(synthesis.reference_images(train, ["a", "b", "c"], ["a"], 50, 0, "x")["a"]) == 10  # all it has


def test_extra_images_join_the_training_set_under_their_class(tmp_path):
    for c, n in (("b", 2), ("c", 1)):
        (tmp_path / "gen" / c).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "gen" / c / f"{i}.png").write_bytes(b"")
    extra = synthesis.images_in_folder(tmp_path / "gen", ["a", "b", "c"])
    paths, labels = training.training_items(["r0", "r1"], [0, 2], ["a", "b", "c"], extra)
    assert labels.tolist() == [0, 2, 1, 1, 2] and paths[:2] == ["r0", "r1"] and paths[2].endswith("b/0.png")
    same = training.training_items(["r0", "r1"], [0, 2], ["a", "b", "c"], lambda c: extra.get(c, []))
    assert same[0] == paths and same[1].tolist() == labels.tolist()
    (tmp_path / "gen" / "x").mkdir()
    with pytest.raises(KeyError, match="folder is not a class"):
        synthesis.images_in_folder(tmp_path / "gen", ["a", "b", "c"])
    with pytest.raises(KeyError, match="unknown class"):
        training.training_items([], [], ["a"], {"z": ["p"]})


# --- end to end ----------------------------------------------------------------------------------

def test_tiny_train_evaluate_report_through_the_cli(fixture, tmp_path, caplog, capsys):
    """data -> train -> evaluate -> report on the fixture: 3 seeds x (CE, logit adjustment with tau and
    prior chosen on val from two values each) plus one extra-image method, a tiny timm model, 1 epoch."""
    spec, lists, _ = fixture
    register_benchmark(spec.name, spec, overwrite=True)
    root = write_tree(tmp_path / "ILSVRC2012", lists)
    gen = tmp_path / "generated"
    for wnid in WNIDS[3:]:  # the few-shot classes get 4 images each
        (gen / wnid).mkdir(parents=True)
        for i in range(4):
            (gen / wnid / f"{i}.png").write_bytes(jpeg(WNIDS.index(wnid), 500 + i))
    cfg = {"benchmarks": [spec.name], "image_roots": {spec.name: str(root)}, "data_dir": str(tmp_path / "data"),
           "results_dir": str(tmp_path / "results"), "seeds": [0, 1, 2], "tau": [1.0, 2.0], "prior": ["all", "real"],
           "extra_images": {"sd": str(gen)}, "progress": False,
           "train": {"model": "test_resnet", "image_size": 12, "epochs": 1, "batch_size": 64, "lr": 0.05,
                     "num_workers": 0, "amp": False, "device": "cpu"}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"longtail": cfg}))
    torch.set_num_threads(1)
    for stage in ("data", "synthesize", "train", "evaluate", "report"):
        assert stages.main([stage, "--params", str(params)]) == 0
    # no synthesis methods: every output of the synthesize stage exists (DVC checks them), empty
    d = tmp_path / "data" / spec.name
    assert all(not any((d / sub).iterdir()) for sub in ("synthetic", "generation-cache", "generation-runs"))
    assert json.loads((d / "negatives.json").read_text()) == {"classes": []}
    assert (d / "synthesis.csv").read_text().count("\n") == 1
    res = tmp_path / "results" / spec.name
    rows = reports.read_accuracy_csv(res / "accuracy.csv")
    assert {(r["method"], r["loss"], r["metric"]) for r in rows} == {
        (m, loss, k) for m in ("real", "sd") for loss in ("ce", "logit-adjusted") for k in evaluation.METRICS}
    assert all(r["seeds"] == 3 and 0 <= r["mean"] <= 1 and r["ci95"] >= 0 for r in rows)
    hp = json.loads((res / "hparams.json").read_text())
    # without extra images both priors are the same counts: real-only is chosen from the taus alone
    assert {(h["tau"], h["prior"]) for h in hp["real/logit-adjusted"]["validation"]} == {(1.0, "all"), (2.0, "all")}
    assert {(h["tau"], h["prior"]) for h in hp["sd/logit-adjusted"]["validation"]} == {
        (t, p) for t in (1.0, 2.0) for p in ("all", "real")}
    assert hp["real/logit-adjusted"]["selected_on"].startswith("val split")
    runs = {p.name: sorted(s.name for s in p.iterdir()) for p in (tmp_path / "data" / spec.name / "runs").iterdir()}
    for method, options in (("real", 2), ("sd", 4)):  # ce, and every option on seed 0; the chosen one trained seeds 1, 2
        chosen = hp[f"{method}/logit-adjusted"]["selected"]
        best = max(hp[f"{method}/logit-adjusted"]["validation"], key=lambda h: h["val_overall"])
        assert chosen == {"tau": best["tau"], "prior": best["prior"]}
        mine = {name: seeds for name, seeds in runs.items() if name.startswith(f"{method}-")}
        assert sorted(mine.values()) == [["seed0"]] * (options - 1) + [["seed0", "seed1", "seed2"]] * 2
        full = [n for n, seeds in mine.items() if seeds == ["seed0", "seed1", "seed2"] and "logit-adjusted" in n]
        assert full[0].startswith(f"{method}-logit-adjusted-tau{chosen['tau']:g}-"
                                  + ("realprior-" if chosen["prior"] == "real" else ""))
        assert ("realprior" in full[0]) == (chosen["prior"] == "real")
    configs = [json.loads(c.read_text()) for c in (tmp_path / "data" / spec.name / "runs").glob("sd-*/seed0/config.json")]
    assert configs and all(c["train_images"] == sum(TRAIN) + 8 and c["real_train_images"] == sum(TRAIN) for c in configs)
    assert {c["prior"] for c in configs if c["loss"] == "logit-adjusted"} == {"all", "real"}
    md = (res / "accuracy.md").read_text()
    assert "| method | loss | many (1 class) | medium (2 classes) | few (2 classes) | overall |" in md
    assert md.count("| real |") == 2 and md.count("| sd |") == 4   # sd: its accuracies, then its gains over real
    metrics = json.loads((res / "metrics.json").read_text())
    assert set(metrics[spec.name]["real"]["ce"]) == set(evaluation.METRICS)
    # sd's gain over real, paired by seed: the per-seed differences of the CSV's values, in the table and metrics
    cell = {(r["method"], r["loss"], r["metric"]): r for r in rows}
    for loss in ("ce", "logit-adjusted"):
        for k in evaluation.METRICS:
            diffs = [float(a) - float(b) for a, b in zip(cell[("sd", loss, k)]["values"].split(";"),
                                                         cell[("real", loss, k)]["values"].split(";"))]
            mean, half = t_interval(diffs)
            got = metrics[spec.name]["sd"][loss][k]
            assert got["gain"] == pytest.approx(mean, abs=1e-6) and got["gain_ci95"] == pytest.approx(half, abs=1e-6)
            assert "gain" not in metrics[spec.name]["real"][loss][k]
    assert "Gain over `real` with the same loss (points)" in md
    per_class = reports.read_class_csv(res / "per_class.csv")
    assert sorted({(r["class_name"], r["train_images"], r["group"]) for r in per_class}) == sorted(
        zip(WNIDS, TRAIN, ("many", "medium", "medium", "few", "few")))
    with Image.open(res / "per_class_accuracy.png") as im:
        assert im.size[0] > 2 * im.size[1]  # one panel per loss, side by side
    # a rerun of train finds every model and trains nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("predictions.npz")}
    assert stages.main(["train", "--params", str(params)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("predictions.npz")} == before
    # damaged outputs (garbage in a predictions file, a truncated split file) are redone, the same
    victim = sorted(before)[0]
    with np.load(victim) as z:
        saved = {k: z[k] for k in z.files}
    blob = victim.read_bytes()
    victim.write_bytes(blob[:len(blob) // 2] + b"\0" * 16 + blob[len(blob) // 2 + 16:])
    split = tmp_path / "data" / spec.name / "prepared" / "train.csv"
    text = split.read_text()
    split.write_text(text[:len(text) // 2])
    with caplog.at_level("WARNING"):
        assert stages.main(["data", "--params", str(params)]) == 0
        assert stages.main(["train", "--params", str(params)]) == 0
    assert split.read_text() == text and any(split.name in r.getMessage() for r in caplog.records)
    assert any(victim.name in r.getMessage() for r in caplog.records)
    with np.load(victim) as z:
        assert saved.keys() == set(z.files) and all(np.array_equal(saved[k], z[k]) for k in saved)
    assert {p: p.stat().st_mtime_ns for p in before if p != victim} == {p: t for p, t in before.items() if p != victim}
    # a damaged extra image (the user's folder): one line naming it, the file left as it is
    bad = gen / WNIDS[3] / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(SystemExit) as e:
        stages.main(["train", "--params", str(params)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and bad.stat().st_size == 40
    assert "\n" not in err and err.startswith(f"error: {bad}: image does not decode"), err


# --- mini-lt: a training set drawn like the miniature world's corpus, synthesis for the rare classes ------

def test_mini_lt_synthesis_plans_the_rare_classes_and_feeds_training(tmp_path, capsys):
    """mini world data (scikit-learn digits) -> mini-lt source -> data -> synthesize through the REAL
    pipelines on tiny models (sd; seedselect with its contrastive loss over chunks of 2 classes, every
    other class a negative; then without negatives) ->
    train (1 epoch) -> evaluate: the manifest holds exactly the medium + few classes x M images, each
    contrast set is one chunk, references come from the class's training images, and the generated
    images join the training set under their class; the heldout stage takes the same classes' unlisted
    real images (the mini world's references split, in the source tree) for the `real-heldout` row."""
    from benchmarks.fewshot.synthesis import read_manifest
    from benchmarks.longtail import mini as mini_lt
    from benchmarks.mini.config import DataConfig
    from benchmarks.mini.data import build, load_split
    from benchmarks.mini.evaluator import build_model
    from pipelines.io import save_tensors, write_json
    from pipelines.testing import save_tiny_image_encoder, save_tiny_pipeline

    torch.set_num_threads(1)
    build(DataConfig(source="sklearn_digits", image_size=32, n_train_tail=2, n_train_head=40, n_test=3, n_val=2,
                     n_references=1, n_encoder=1, n_evaluator=1), tmp_path / "mini")
    save_tiny_pipeline(tmp_path / "sd")
    save_tiny_image_encoder(tmp_path / "clip")
    src = tmp_path / "source"
    m = 2
    cfg = {"benchmarks": [str(src / "spec.json")], "image_roots": {"mini-lt": str(src / "images")},
           "data_dir": str(tmp_path / "data"), "results_dir": str(tmp_path / "results"), "progress": False, "losses": ["ce"],
           "synthesis": {"methods": ["sd", "seedselect"], "images_per_class": m, "references_per_class": 3,
                         "contrast_size": 2, "settings": {
                             "preset": "fast", "model": str(tmp_path / "sd"), "image_encoder": str(tmp_path / "clip"),
                             "device": "cpu", "methods": {
                                 "sd": {"num_inference_steps": 2},
                                 "seedselect": {"num_inference_steps": 3, "iterations": 1, "bootstrap_iterations": 1}}}},
           "train": {"model": "test_resnet", "image_size": 32, "epochs": 1, "batch_size": 64, "hflip": False,
                     "crop_scale": [0.7, 1.0], "test_resize": 1.0, "num_workers": 0, "amp": False, "device": "cpu"}}
    params = tmp_path / "params.yaml"
    cfg["heldout"] = {"images_per_class": 1}
    params.write_text(yaml.safe_dump({"longtail": cfg, "mini_lt": {"mini_data": str(tmp_path / "mini"), "out_dir": str(src)}}))
    assert mini_lt.main(["source", "--params", str(params)]) == 0
    spec = get_benchmark(str(src / "spec.json"))
    # the classifier's set: the corpus's counts, drawn apart from it (the rare digits' mostly new images),
    # never an image of a balanced split, each named by its source index; `corpus` gives the corpus itself
    corpus_images, corpus_labels = load_split(tmp_path / "mini", "train")
    listed = [line.split() for line in (src / "lists" / "train.txt").read_text().splitlines()]
    train = torch.stack([torch.from_numpy(np.array(Image.open(src / "images" / f))).permute(2, 0, 1) for f, _ in listed])
    train_labels = torch.tensor([int(y) for _, y in listed])
    assert torch.equal(torch.bincount(train_labels, minlength=10), torch.bincount(corpus_labels, minlength=10))
    corpus_set = {x.numpy().tobytes() for x in corpus_images}
    held = {x.numpy().tobytes() for s in ("test", "val", "references", "encoder", "evaluator") for x in load_split(tmp_path / "mini", s)[0]}
    assert not held & {x.numpy().tobytes() for x in train}
    shared = {c: sum(x.numpy().tobytes() in corpus_set for x, y in zip(train, train_labels.tolist()) if y == k)
              for k, c in enumerate(spec.classes)}
    source = json.loads((src / "source.json").read_text())
    assert source["train_images_shared_with_corpus"] == shared and shared["two"] < 2 and shared["five"] < 2
    images, labels, parts, _ = mini_lt.source_splits(mini_lt.MiniLongTailParams(mini_data=str(tmp_path / "mini")))
    assert [f for f, _ in listed] == [f"train/{spec.classes[labels[i]]}/{spec.classes[labels[i]]}_train_{i:04d}.png"
                                      for i in parts["train"].tolist()]
    images, labels, parts, shared = mini_lt.source_splits(mini_lt.MiniLongTailParams(mini_data=str(tmp_path / "mini"), train_draw="corpus"))
    assert torch.equal(images[parts["train"]], corpus_images) and torch.equal(labels[parts["train"]], corpus_labels)
    assert shared == {c: int((corpus_labels == k).sum()) for k, c in enumerate(spec.classes)}
    with pytest.raises(ValueError, match="unknown train_draw"):
        mini_lt.MiniLongTailParams(train_draw="fresh")
    # the draw's key: another seed draws other rare-digit images, the same counts
    other = mini_lt.source_splits(mini_lt.MiniLongTailParams(mini_data=str(tmp_path / "mini"), seed=1))[2]["train"]
    assert np.array_equal(np.bincount(labels[other], minlength=10), np.bincount(labels[parts["train"]], minlength=10))
    assert set(other.tolist()) != set(mini_lt.source_splits(mini_lt.MiniLongTailParams(mini_data=str(tmp_path / "mini")))[2]["train"].tolist())
    # mini data whose corpus is not what its manifest's config draws: one line, nothing written
    shutil.copytree(tmp_path / "mini", tmp_path / "mini-other")
    manifest = json.loads((tmp_path / "mini-other" / "manifest.json").read_text())
    manifest["config"]["seed"] += 1
    (tmp_path / "mini-other" / "manifest.json").write_text(json.dumps(manifest))
    params.write_text(yaml.safe_dump({"mini_lt": {"mini_data": str(tmp_path / "mini-other"), "out_dir": str(tmp_path / "other")}}))
    with pytest.raises(SystemExit) as e:
        mini_lt.main(["source", "--params", str(params)])
    assert e.value.code == 2 and "rebuild it" in capsys.readouterr().err \
        and not (tmp_path / "other").exists() and not (tmp_path / ".other.tmp").exists()
    for damage in ("{", json.dumps({"class_names": []}), json.dumps({"config": {"no_such_field": 1}})):
        (tmp_path / "mini-other" / "manifest.json").write_text(damage)
        with pytest.raises(SystemExit) as e:
            mini_lt.main(["source", "--params", str(params)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "manifest.json: no readable mini data config" in err, err
    (tmp_path / "mini-other" / "manifest.json").unlink()
    with pytest.raises(SystemExit) as e:
        mini_lt.main(["source", "--params", str(params)])
    assert e.value.code == 2 and "run the mini_data stage" in capsys.readouterr().err
    params.write_text(yaml.safe_dump({"longtail": cfg, "mini_lt": {"mini_data": str(tmp_path / "mini"), "out_dir": str(src)}}))
    # counts 40 .. 2 over 8 levels; thresholds scaled from ImageNet-LT's 20 / 100 over 5..1280
    assert (spec.many_shot_threshold, spec.few_shot_threshold) == mini_lt.scaled_thresholds(2, 40)
    for stage in ("data", "heldout", "synthesize"):
        assert stages.main([stage, "--params", str(params)]) == 0
    run = stages.Run(stages.load_section(stages.LongTailParams, "longtail", params), str(src / "spec.json"))
    counts = dict(zip(spec.classes, run.train_counts.tolist()))
    rare = [c for c in spec.classes if evaluation.shot_group(counts[c], spec.many_shot_threshold,
                                                              spec.few_shot_threshold) != "many"]
    assert {"two", "five"} <= set(rare) and len(rare) >= 4
    ref_images, ref_labels = load_split(tmp_path / "mini", "references")
    heldout = run.heldout_dir
    assert sorted(p.name for p in heldout.iterdir() if p.is_dir()) == sorted(rare)
    for c in rare:
        (f,) = (heldout / c).iterdir()
        assert np.array_equal(np.asarray(Image.open(f)), ref_images[ref_labels == spec.classes.index(c)][0].permute(1, 2, 0).numpy())
    rows = read_manifest(run.manifest_path)
    for method in ("sd", "seedselect"):
        mine = [r for r in rows if r.method == method]
        assert sorted({r.class_name for r in mine}) == sorted(rare)
        assert all(sum(r.class_name == c for r in mine) == m for c in rare)
        chunks = {}
        for r in mine:
            chunks.setdefault(r.trial, set()).add(r.class_name)
        assert sorted(map(sorted, chunks.values())) == sorted(map(sorted, synthesis.contrast_sets(spec.classes, dict.fromkeys(rare, m), 2)))
        train_files = {Path(p).name: spec.classes[y] for p, y in zip(run.splits["train"].paths, run.splits["train"].labels)}
        for r in mine:
            refs = [Path(p).name for p in r.refs.split(";")]
            assert len(refs) == min(3, counts[r.class_name]) and all(train_files.get(f) == r.class_name for f in refs)
            assert Path(r.path).is_file()
    contrast = [json.loads(p.read_text()) for p in (run.dir / "generation-runs").glob("seedselect-*/*/seedselect-*-00000.json")]
    assert len(contrast) == len(rare)
    # contrast_with: all: two generated digits per call, pushed from the other eight digits' centroids too
    negatives = json.loads((run.dir / "negatives.json").read_text())["classes"]
    assert [n["class"] for n in negatives] == list(spec.classes)
    assert all(train_files.get(Path(f).name) == n["class"] for n in negatives for f in n["references"])
    assert all(r.refs.split(";") == negatives[spec.classes.index(r.class_name)]["references"] for r in rows)
    for rec in contrast:
        assert [c.get("negatives") for c in rec["contrast_set"]] == [None, None, len(spec.classes) - 2]
    # the fidelity diagnostic, with an evaluator that calls every image a two: it counts per method and class
    judge = tmp_path / "evaluator"
    judge.mkdir()
    model = build_model("test_resnet", len(spec.classes))
    torch.nn.init.zeros_(model.get_classifier().weight)
    model.get_classifier().bias.data = 5.0 * F.one_hot(torch.tensor(spec.classes.index("two")), len(spec.classes)).float()
    save_tensors(judge / "model.safetensors", model.state_dict())
    write_json(judge / "config.json", {"architecture": "test_resnet", "num_classes": len(spec.classes),
                                       "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    judged = {"mini_data": str(tmp_path / "mini"), "out_dir": str(src), "evaluator": str(judge),
              "image_encoder": str(tmp_path / "clip")}
    params.write_text(yaml.safe_dump({"longtail": cfg, "mini_lt": judged}))
    assert mini_lt.main(["fidelity", "--params", str(params)]) == 0
    fid = json.loads((tmp_path / "results" / "mini-lt" / "fidelity.json").read_text())
    assert sorted(fid["generated"]) == ["sd", "seedselect"]
    for method, by_class in fid["generated"].items():
        assert sorted(by_class) == sorted(rare)
        assert all(n["images"] == m and n["evaluator"] == (m if c == "two" else 0) and 0 <= n["encoder"] <= m
                   for c, n in by_class.items())
    val_counts = {c: int(np.sum(run.splits["val"].labels == k)) for k, c in enumerate(spec.classes)}
    assert {c: n["images"] for c, n in fid["val"].items()} == val_counts
    assert {c: n["evaluator"] for c, n in fid["val"].items()} == {c: (k if c == "two" else 0) for c, k in val_counts.items()}
    assert "| two | 2 | 2 |" in (tmp_path / "results" / "mini-lt" / "fidelity.md").read_text()
    params.write_text(yaml.safe_dump({"longtail": cfg, "mini_lt": {**judged, "evaluator": str(tmp_path / "none")}}))
    with pytest.raises(SystemExit) as e:
        mini_lt.main(["fidelity", "--params", str(params)])
    assert e.value.code == 2
    # contrast_with: generated: new seedselect images (their names hash the contrast), the same sd ones
    generated = {**cfg, "synthesis": {**cfg["synthesis"], "contrast_with": "generated"}}
    params.write_text(yaml.safe_dump({"longtail": generated, "mini_lt": {"mini_data": str(tmp_path / "mini"), "out_dir": str(src)}}))
    assert stages.main(["synthesize", "--params", str(params)]) == 0
    alone = read_manifest(run.manifest_path)
    assert json.loads((run.dir / "negatives.json").read_text()) == {"classes": []}
    assert [r.path for r in alone if r.method == "sd"] == [r.path for r in rows if r.method == "sd"]
    assert not {r.path for r in alone if r.method == "seedselect"} & {r.path for r in rows if r.method == "seedselect"}
    records = [json.loads(p.read_text()) for p in (run.dir / "generation-runs").glob("seedselect-*/*/seedselect-*-00000.json")]
    assert sorted(len(rec["contrast_set"]) for rec in records) == [2] * len(rare) + [3] * len(rare)
    params.write_text(yaml.safe_dump({"longtail": cfg, "mini_lt": {"mini_data": str(tmp_path / "mini"), "out_dir": str(src)}}))
    assert stages.main(["synthesize", "--params", str(params)]) == 0   # all finished: only the manifest is rewritten
    assert read_manifest(run.manifest_path) == rows
    assert stages.main(["train", "--params", str(params)]) == 0
    configs = {c.parts[-3].rsplit("-ce-", 1)[0]: json.loads(c.read_text()) for c in run.dir.glob("runs/*-ce-*/seed0/config.json")}
    real = len(run.splits["train"].paths)
    assert configs["real"]["train_images"] == real and configs["sd"]["train_images"] == real + m * len(rare)
    assert configs["real-heldout"]["train_images"] == real + len(rare)
    assert stages.main(["evaluate", "--params", str(params)]) == 0
    assert {r["method"] for r in reports.read_accuracy_csv(tmp_path / "results" / "mini-lt" / "accuracy.csv")} == \
        {"real", "sd", "seedselect", "real-heldout"}
    assert stages.main(["report", "--params", str(params)]) == 0
    assert "`real-heldout`: the real training set plus 1 real training images of each medium + few-shot class that no " \
        "list holds" in (tmp_path / "results" / "mini-lt" / "accuracy.md").read_text()
    # more held-out images than the references split holds: one line naming a class, nothing replaced
    before = sorted(p.relative_to(heldout) for p in heldout.rglob("*"))
    params.write_text(yaml.safe_dump({"longtail": {**cfg, "heldout": {"images_per_class": 2}},
                                      "mini_lt": {"mini_data": str(tmp_path / "mini"), "out_dir": str(src)}}))
    with pytest.raises(SystemExit) as e:
        stages.main(["heldout", "--params", str(params)])
    assert e.value.code == 2
    assert sorted(p.relative_to(heldout) for p in heldout.rglob("*")) == before
