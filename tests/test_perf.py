"""The GPU speed benchmarks' code paths, run on the CPU with the test-size models (their figures
come from a lent GPU; these runs keep the scripts from rotting between such loans)."""
import json

import pytest
import torch

from benchmarks.perf.__main__ import main


def _run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_seedselect_sd21_dry_run_times_every_measurement_of_both_presets(capsys, tmp_path):
    out = tmp_path / "sd21.json"
    result = _run(capsys, ["seedselect", "--sd21", "--tiny", "--device", "cpu", "--repeats", "1",
                           "--negatives", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    runs = result["sd21_base_512"]
    assert runs["models"] == "tiny"
    for preset, batch in (("reference", 1), ("fast", 4)):
        row = runs[preset]
        assert row["dtype"] == "fp32"  # auto-bf16 means bf16 on CUDA only
        assert set(k for k in row if k.startswith("generation_batch_")) == {"generation_batch_1", "generation_batch_8"}
        for key in ("negatives_0", "negatives_3", "negatives_0_repeat"):
            it = row[f"seedselect_iteration_{key}"]
            assert it["batch_size"] == batch and it["seconds"] > 0 and it["peak_gpu_gib"] is None
        nao = row["nao_seedselect_iteration"]  # its own batch and no guidance
        assert (nao["batch_size"], nao["guidance_scale"]) == ((1, 1.0) if preset == "reference" else (8, 1.0))
        assert row["ddim_inversion_batch_5"]["steps"] == 50
        assert row["iteration_per_seed_over_S"] == pytest.approx(
            row["seedselect_iteration_negatives_0"]["seconds_per_seed"] / row["generation_batch_1"]["seconds"], abs=0.01)


def test_longtail_training_throughput_dry_run(capsys):
    result = _run(capsys, ["longtail", "--device", "cpu", "--model", "resnet18", "--image-size", "32",
                           "--images", "32", "--batch-size", "16", "--num-workers", "0", "--epochs", "1",
                           "--classes", "4", "--source-size", "64", "48"])
    assert result["images_per_second"] > 0 and result["amp_bf16"] is False
    extra_epoch = result["seconds_2_epochs"] - result["seconds_1_epoch"]  # each rounded to 0.01 s
    assert 32 / (extra_epoch + 0.011) <= result["images_per_second"] <= 32 / max(extra_epoch - 0.011, 1e-3)
    assert result["hours_per_imagenet_lt_run"] == pytest.approx(
        90 * 115_846 / result["images_per_second"] / 3600, rel=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA device runs them")
@pytest.mark.parametrize("argv", [["seedselect", "--sd21"], ["longtail"]])
def test_gpu_benchmarks_refuse_in_one_line_without_a_cuda_device(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "no CUDA device is available here" in capsys.readouterr().err
