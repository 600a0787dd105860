"""Accuracy tables, DVC metrics, plots and sample grids."""
import json

import pytest
from PIL import Image

from benchmarks.fewshot.reports import (markdown_table, read_accuracy_csv, write_combined, write_report,
                                        write_sample_grids)

SPAN = {"episodes": 600, "replicates": 3, "trials": 8, "resamples": 2000}
ROWS = [
    {"benchmark": "digits", "method": "real-only", "head": "prototype", "shot": 1, "mean": 0.5012, "ci95": 0.0123,
     "gain": None, "gain_ci95": None, **SPAN},
    {"benchmark": "digits", "method": "real-only", "head": "prototype", "shot": 5, "mean": 0.7, "ci95": 0.01,
     "gain": None, "gain_ci95": None, **SPAN},
    {"benchmark": "digits", "method": "augment", "head": "prototype", "shot": 1, "mean": 0.55, "ci95": 0.02,
     "gain": 0.0488, "gain_ci95": 0.005, **SPAN},
]


def test_markdown_table_shows_accuracy_gain_and_what_the_interval_covers():
    md = markdown_table(ROWS, methods=["real-only", "augment"])
    lines = md.splitlines()
    assert lines[0].startswith("### digits — prototype head (600 episodes")
    assert lines[2] == "| method | 1-shot | Δ 1-shot | 5-shot | Δ 5-shot |"
    assert lines[4] == "| real-only | 50.12 ± 1.23 | – | 70.00 ± 1.00 | – |"
    assert lines[5] == "| augment | 55.00 ± 2.00 | +4.88 ± 0.50 | – | – |"
    assert lines[7].startswith("± = 95% interval over 3 backbone replicate(s)")
    assert "bootstrap over the 8 support-set trials per class (2000 resamples" in lines[7]
    assert "paired by episode and replicate" in lines[7]
    nothing_resampled = [{**ROWS[0], "ci95": float("nan"), "replicates": 1, "trials": 1}]
    assert "| real-only | 50.12 ± n/a | – |" in markdown_table(nothing_resampled)


def test_report_files(tmp_path):
    paths = write_report(ROWS, tmp_path / "digits", methods=["real-only", "augment"])
    assert read_accuracy_csv(paths["csv"]) == sorted(ROWS, key=lambda r: (r["benchmark"], r["head"], r["method"], r["shot"]))
    m = json.loads(paths["metrics"].read_text())
    assert m["digits"]["prototype"]["real-only"]["5shot"] == {"mean": 0.7, "ci95": 0.01, "gain": None, "gain_ci95": None,
                                                              **SPAN}
    assert m["digits"]["prototype"]["augment"]["1shot"]["gain"] == 0.0488 and "cluster bootstrap" in m["interval"]
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    combined = write_combined([paths["csv"]], tmp_path / "combined.md").read_text()
    assert "| real-only | 50.12 ± 1.23 | – | 70.00 ± 1.00 | – |" in combined and "± = 95% interval over 3" in combined


def test_sample_grids(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (10, 10), (50 * i, 0, 0)).save(p)
        paths.append(str(p))
    out = write_sample_grids({("augment", "001.Black_footed_Albatross"): paths}, tmp_path / "grids", columns=4)
    assert out == [tmp_path / "grids" / "augment" / "001.Black_footed_Albatross.png"]
    with Image.open(out[0]) as im:
        assert im.size == (4 * 96, 2 * 96)
        assert im.getpixel((96 + 5, 5)) == (50, 0, 0) and im.getpixel((5, 96 + 5)) == (200, 0, 0)
        assert im.getpixel((96 + 5, 96 + 5)) == (255, 255, 255)  # empty cell
    with pytest.raises(ValueError, match="no images"):
        write_sample_grids({("m", "c"): []}, tmp_path / "g2")
