"""benchmarks.compare: two runs' figures against their own intervals, and their bit-identical outputs."""
import json

import pytest
import yaml

from benchmarks import compare


def _run(root, metrics: dict, outs: dict):
    (root / "results" / "x").mkdir(parents=True)
    (root / "results" / "x" / "metrics.json").write_text(json.dumps(metrics))
    stages = {name: {"cmd": "c", "outs": [{"path": path, "md5": md5}]} for name, (path, md5) in outs.items()}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    return root


def test_figures_pair_each_number_with_its_own_interval():
    m = {"a": {"mean": 0.5, "ci95": 0.1, "gain": 0.2, "gain_ci95": 0.05, "seeds": 3},
         "ratio": 0.3, "ratio_ci95": 0.01, "bare": 1.0, "flag": True}
    assert compare.figures(m) == {"a/mean": (0.5, 0.1), "a/gain": (0.2, 0.05), "ratio": (0.3, 0.01)}


def test_compare_counts_agreement_and_identical_outputs(tmp_path, capsys):
    a = _run(tmp_path / "a", {"m1": {"mean": 0.50, "ci95": 0.10}, "m2": {"mean": 0.50, "ci95": 0.02},
                              "only_a": {"mean": 1.0, "ci95": 0.1}},
             {"s1": ("data/x", "aaa"), "s2": ("data/y", "bbb")})
    b = _run(tmp_path / "b", {"m1": {"mean": 0.55, "ci95": 0.01}, "m2": {"mean": 0.60, "ci95": 0.02}},
             {"s1": ("data/x", "aaa"), "s2": ("data/y", "ccc")})
    r = compare.compare(a, b)
    rows = {row["figure"].split(":")[1]: row for row in r["rows"]}
    # m1: B inside A (0.05 <= 0.10), A not inside B (0.05 > 0.01), overlap; m2: 0.10 apart, neither, no overlap
    assert (rows["m1/mean"]["b_inside_a"], rows["m1/mean"]["a_inside_b"], rows["m1/mean"]["overlap"]) == (True, False, True)
    assert (rows["m2/mean"]["b_inside_a"], rows["m2/mean"]["a_inside_b"], rows["m2/mean"]["overlap"]) == (False, False, False)
    assert r["b_inside_a_share"] == 0.5 and r["overlap_share"] == 0.5 and r["figures"] == 2
    assert r["identical_outputs"] == ["s1:data/x"] and r["different_outputs"] == ["s2:data/y"]
    assert r["only_in_a"] == ["results/x/metrics.json:only_a/mean"]
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    assert "| results/x/metrics.json:m2/mean |" in (tmp_path / "cmp.md").read_text()
    assert json.loads(capsys.readouterr().out)["identical_outputs"] == 1


def test_nothing_in_common_is_a_one_line_error(tmp_path, capsys):
    a = _run(tmp_path / "a", {"m": {"mean": 0.5, "ci95": 0.1}}, {})
    b = _run(tmp_path / "b", {"n": {"mean": 0.5, "ci95": 0.1}}, {})
    with pytest.raises(SystemExit) as e:
        compare.main([str(a), str(b)])
    assert e.value.code == 2 and "no figure with an interval" in capsys.readouterr().err
