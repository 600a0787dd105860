"""Registry, shipped splits, download/prepare and integrity checks (datasets side)."""
import json

import datasets
import pytest
from fewshot_digits import single_torch_thread, CLASSES, PER_CLASS, digits_spec, write_digits_source

from benchmarks.fewshot import data
from benchmarks.fewshot.registry import (SPLITS, UnknownNameError, cub_split_by_rule, get_benchmark,
                                         list_benchmarks, shipped_split)


def test_registry_has_the_three_benchmarks_with_standard_split_sizes():
    assert {"cub", "miniimagenet", "cifar-fs"} <= set(list_benchmarks())
    sizes = {name: tuple(len(get_benchmark(name).classes[s]) for s in SPLITS) for name in ("cub", "miniimagenet", "cifar-fs")}
    assert sizes == {"cub": (100, 50, 50), "miniimagenet": (64, 16, 20), "cifar-fs": (64, 16, 20)}
    mini = get_benchmark("miniimagenet")
    assert mini.images_per_split == {"train": 38400, "val": 9600, "test": 12000}
    assert mini.display_name("n01532829") == "house finch"
    assert get_benchmark("cub").display_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert get_benchmark("cifar-fs", hf_id="/mirror").hf_id == "/mirror"


def test_cub_split_rule_matches_the_shipped_json():
    shipped = shipped_split("cub")
    every = [c for s in SPLITS for c in shipped[s]]
    assert cub_split_by_rule(every) == shipped
    ids = {s: [int(c.split(".")[0]) for c in shipped[s]] for s in SPLITS}
    assert all(i % 2 == 1 for i in ids["train"])
    assert all(i % 4 == 2 for i in ids["val"]) and all(i % 4 == 0 for i in ids["test"])


def test_cifar_fs_split_names_and_disjointness():
    spec = get_benchmark("cifar-fs")
    assert "crab" in spec.classes["val"] and "whale" in spec.classes["test"]
    assert len(set(spec.all_classes)) == 100


def test_unknown_benchmark_and_class_suggest_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'miniimagenet'"):
        get_benchmark("mini_imagenet")
    with pytest.raises(UnknownNameError, match="did you mean 'whale'"):
        get_benchmark("cifar-fs").check_classes(["whales"])
    with pytest.raises(UnknownNameError, match="split 'val'"):
        get_benchmark("cifar-fs").check_classes(["whale"], split="val")


def test_package_data_is_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["benchmarks.fewshot"]
    assert "splits/*/*.json" in patterns


@pytest.fixture
def source(tmp_path):
    return write_digits_source(tmp_path / "src")


def test_prepare_builds_checked_dataset_and_skips_when_done(source, tmp_path):
    spec = digits_spec(source)
    out = data.prepare(spec, tmp_path / "prep", cache_dir=str(tmp_path / "hf"), progress=False)
    ds = data.load_prepared(spec, out)
    assert ds.num_rows == 10 * PER_CLASS
    counts = data.count_images(ds)
    assert all(counts[(s, c)] == PER_CLASS for s in SPLITS for c in CLASSES[s])
    # labels are positions in spec.all_classes, images decode
    assert spec.all_classes[ds[5]["label"]] == ds[5]["class_name"]
    assert ds[0]["image"].size == (32, 32)
    record = json.loads((out / "integrity.json").read_text())
    assert record["splits"]["test"] == {"classes": 3, "images": 3 * PER_CLASS}
    stamp = (out / "integrity.json").stat().st_mtime_ns
    data.prepare(spec, out, source=datasets.DatasetDict())  # would fail if it tried to redo the work
    assert (out / "integrity.json").stat().st_mtime_ns == stamp


def test_incomplete_download_is_detected_naming_the_class(tmp_path):
    src = write_digits_source(tmp_path / "src", drop=3)  # the last class ("nine", test) loses 3 images
    with pytest.raises(data.DatasetIntegrityError, match=r"class 'nine' \(test\): 21 images, expected 24"):
        data.prepare(digits_spec(src), tmp_path / "prep", cache_dir=str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "prep").exists()


def test_missing_class_and_corrupt_image_are_detected(source, tmp_path):
    spec = digits_spec(source)
    raw = datasets.load_dataset(str(source), cache_dir=str(tmp_path / "hf"))
    no_eight = datasets.DatasetDict({k: v.filter(lambda r: r["label"] != 8) for k, v in raw.items()})
    with pytest.raises(data.DatasetIntegrityError, match=r"split 'test': 2 classes, expected 3; missing \['eight'\]"):
        data.prepare(spec, tmp_path / "a", source=no_eight, progress=False)

    undecoded = raw.cast_column("image", datasets.Image(decode=False))

    def corrupt(row, i):
        if i == 7:
            row["image"] = {"bytes": row["image"]["bytes"][:40], "path": None}  # truncated PNG
        return row

    broken = datasets.DatasetDict({"train": undecoded["train"].map(corrupt, with_indices=True), "test": undecoded["test"]})
    with pytest.raises(data.DatasetIntegrityError, match=r"row 7 \(class 'zero'\): image does not decode"):
        data.prepare(spec, tmp_path / "b", source=broken, progress=False)
    # the count check alone passes: only decoding finds it
    data.prepare(spec, tmp_path / "c", source=broken, check_images=False, progress=False)


def test_damaged_prepared_copy_is_caught_on_load(source, tmp_path):
    spec = digits_spec(source)
    out = data.prepare(spec, tmp_path / "prep", cache_dir=str(tmp_path / "hf"), progress=False)
    bigger = digits_spec(source, per_class=PER_CLASS + 1)
    with pytest.raises(data.DatasetIntegrityError, match="expected 25"):
        data.load_prepared(bigger, out)
    with pytest.raises(data.DatasetIntegrityError, match="delete that directory to rebuild it"):
        data.prepare(bigger, out)
    with pytest.raises(FileNotFoundError, match="run the download stage"):
        data.load_prepared(spec, tmp_path / "nothing")


def test_unknown_source_label_is_reported(source, tmp_path):
    spec = digits_spec(source)
    raw = datasets.load_dataset(str(source), cache_dir=str(tmp_path / "hf"))
    renamed = raw.cast_column("label", datasets.ClassLabel(names=["zero", "one", "two", "three", "four", "five", "six",
                                                                     "seven", "eight", "nines"]))
    with pytest.raises(data.DatasetIntegrityError, match="no class 'nines'; did you mean 'nine'"):
        data.prepare(spec, tmp_path / "prep", source=renamed, progress=False)


def test_plain_integer_labels_map_by_rank_within_each_split(tmp_path):
    """A source that stores plain int labels per split (e.g. GATE-engine/mini_imagenet): offsets
    (4..6 for val) must map to the split's classes in order, and a split with too few labels is an error."""
    from dataclasses import replace

    from fewshot_digits import digit_images

    images, labels = digit_images(per_class=PER_CLASS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    part = {"train": range(0, 4), "validation": range(4, 7), "test": range(7, 10)}
    source = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"image": [im for im, y in zip(images, labels) if y in r],
                                          "label": [y for y in labels if y in r]}, features=features)
        for name, r in part.items()})
    spec = replace(digits_spec("local"), source_splits={"train": "train", "validation": "val", "test": "test"},
                   label_mode="per_split_rank")
    ds = data.load_prepared(spec, data.prepare(spec, tmp_path / "prep", source=source, progress=False))
    truth = dict(zip(range(10), [c for s in SPLITS for c in CLASSES[s]]))
    source_labels = [y for r in part.values() for y in labels if y in r]
    assert ds["class_name"] == [truth[y] for y in source_labels]
    short = datasets.DatasetDict({**source, "test": source["test"].filter(lambda r: r["label"] != 9)})
    with pytest.raises(data.DatasetIntegrityError, match=r"\[test\]: 2 distinct labels, expected the 3 classes"):
        data.prepare(spec, tmp_path / "p2", source=short, progress=False)


def test_benchmark_from_a_json_spec_file(tmp_path):
    """How an offline world (or any new dataset) plugs in without code: a spec file as the name."""
    spec = digits_spec(tmp_path / "src")
    path = data.save_spec_json(spec, tmp_path / "digits.json")
    assert get_benchmark(str(path)) == spec
    assert get_benchmark(str(path), hf_id="elsewhere").hf_id == "elsewhere"


def test_shipped_split_files_are_the_published_bytes():
    import hashlib
    from importlib import resources

    expected = {"miniimagenet/classes.json": "b70980f486de7f37", "cifar-fs/train.json": "e0feef3aef13fc73",
                "cifar-fs/val.json": "d9d6e267b5dad5c2", "cifar-fs/test.json": "e199c74ef4f014ea",
                "cub/train.json": "ec90b228abb61002", "cub/val.json": "fff92a7293e7e529",
                "cub/test.json": "41c79218a7bd4c2f", "imagenet/imagenet_class_index.json": "ecae206bed9024d3"}
    root = resources.files("benchmarks.fewshot").joinpath("splits")
    got = {name: hashlib.sha256(root.joinpath(*name.split("/")).read_bytes()).hexdigest()[:16] for name in expected}
    assert got == expected


def test_mini_imagenet_in_the_timm_schema_is_split_by_wnid(tmp_path):
    """timm/mini-imagenet: every class in every hub split, labelled by wnid; train + validation pooled
    (600 per class), test (ImageNet-1k validation images) left out; then split by the shipped lists."""
    from hub_fixtures import write_mini_imagenet

    src = str(write_mini_imagenet(tmp_path / "src"))  # the hub's counts: the exact figures apply to it
    spec = get_benchmark("miniimagenet", hf_id=src, counts_source=src)
    ds = data.load_prepared(spec, data.prepare(spec, tmp_path / "prep", cache_dir=str(tmp_path / "hf"),
                                               check_images=False, progress=False))
    counts = data.count_images(ds)
    assert ds.num_rows == 60000 and set(counts.values()) == {600}
    assert counts[("test", "n01930112")] == 600 and counts[("train", "n01532829")] == 600
    assert spec.display_name("n01930112") == "nematode"


def test_mini_imagenet_label_that_is_not_a_known_wnid_fails_loudly(tmp_path):
    from hub_fixtures import write_mini_imagenet

    src = write_mini_imagenet(tmp_path / "src", per_split={"train": 1, "validation": 1},
                              rename={"n01930112": "n99999999"})
    with pytest.raises(data.DatasetIntegrityError, match="no class 'n99999999'"):
        data.prepare(get_benchmark("miniimagenet", hf_id=str(src)), tmp_path / "prep", cache_dir=str(tmp_path / "hf"),
                     progress=False)
    assert not (tmp_path / "prep").exists()


def test_mini_imagenet_missing_class_fails_the_class_count(tmp_path):
    from hub_fixtures import write_mini_imagenet

    spec = get_benchmark("miniimagenet", hf_id=str(write_mini_imagenet(tmp_path / "src", per_split={"train": 1})))
    source = datasets.load_dataset(spec.hf_id, cache_dir=str(tmp_path / "hf"))
    source = datasets.DatasetDict({"train": source["train"].filter(lambda r: r["label"] != 0),
                                   "validation": source["train"].select([])})
    with pytest.raises(data.DatasetIntegrityError, match=r"split 'train': 63 classes, expected 64; missing \['n01532829'\]"):
        data.prepare(spec, tmp_path / "prep", source=source, check_images=False, progress=False)


def test_cifar_label_cra_is_prompted_as_crab(tmp_path):
    """The hub's CIFAR-100 label names spell class 26 "cra"; the class and every prompt say crab."""
    from pathlib import Path

    from hub_fixtures import write_cifar100

    from benchmarks.fewshot.stages import FewShotParams, Run
    from benchmarks.params import load_section
    from pipelines.prompts import format_prompt

    src = write_cifar100(tmp_path / "src", per_split={"train": 1, "test": 1})
    source = datasets.load_dataset(str(src), cache_dir=str(tmp_path / "hf"))
    assert source["train"].features["fine_label"].names[26] == "cra"
    spec = get_benchmark("cifar-fs", hf_id=str(src))
    names = data.canonicalize(spec, source)["class_name"]
    assert names[26] == "crab" and "cra" not in names
    p = load_section(FewShotParams, "fewshot", Path(__file__).parents[1] / "profiles" / "paper" / "params.yaml")
    template = p.synthesis.settings["methods"]["seedselect"]["prompt_template"]
    assert format_prompt(Run(p, "cifar-fs").prompt(names[26]), template) == "a photo of a crab"


def test_exact_counts_are_facts_of_the_id_they_describe(source, tmp_path):
    """A source other than the one the exact counts describe is checked for its classes and minimum
    per class only, and the integrity record says so; the same figures bind their own id."""
    from dataclasses import replace

    bigger = replace(digits_spec(source, per_class=PER_CLASS + 1), counts_source="owner/the-hub-copy",
                     min_images_per_class=PER_CLASS)
    out = data.prepare(bigger, tmp_path / "prep", cache_dir=str(tmp_path / "hf"), check_images=False, progress=False)
    assert json.loads((out / "integrity.json").read_text())["exact_counts"].startswith(
        "not checked: the source is not owner/the-hub-copy")
    with pytest.raises(data.DatasetIntegrityError, match="expected 25"):
        data.verify(data.load_prepared(bigger, out), replace(bigger, counts_source=str(source)), check_images=False)
