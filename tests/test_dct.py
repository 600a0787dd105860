"""Discriminative Class Tokens on tiny random models: what is trained, where gradients flow, the
stopping rule, token persistence, and the pluggable classifiers."""
import numpy as np
import pytest
import torch

from pipelines.classifiers import ImageClassifier, load_classifier
from pipelines.dct import DctPipeline, DctSettings, DctToken, train_or_load_token
from pipelines.testing import tiny_components

LABELS = ["tabby, tabby cat", "tiger cat", "Persian cat", "zebra", "goldfish"]


class TinyNet(torch.nn.Module):
    """A small conv classifier; ``bias`` pins chosen logits so a test controls what it predicts."""

    def __init__(self, num_classes=5, seed=0, bias=None, constant=False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, num_classes)
        self.register_buffer("bias", torch.zeros(num_classes) if bias is None else torch.tensor(bias, dtype=torch.float32))
        self.constant = constant

    def forward(self, x):
        if self.constant:  # ignores the image: the loss cannot improve
            return self.bias.expand(x.shape[0], -1) + 0 * x.sum()
        return self.head(torch.relu(self.conv(x)).mean((2, 3))) + self.bias


def classifier(**kw):
    return ImageClassifier(TinyNet(**kw), LABELS, (32, 32), 32, (0.5,) * 3, (0.5,) * 3, source="tiny")


@pytest.fixture(scope="module")
def pipe():
    return DctPipeline.from_components(tiny_components())


def fast(**kw):
    base = dict(num_inference_steps=3, epoch_size=2, min_correct=2, max_epochs=2, patience=5, lr=0.05,
                guidance_scale=3.0, batch_size=2)
    return DctSettings(**{**base, **kw})


def test_only_the_placeholder_embedding_is_trained(pipe):
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    guide = classifier(bias=[0, -20, 0, 0, 0])  # never predicts the target: no early success
    settings = fast()
    token = pipe.train_token("tiger cat", guide, 1, settings, progress=False)
    # the token returned is the best evaluated one; train once more to see the update happen
    assert token.record["epochs"] == 2
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)  # vocabulary bit-identical
    assert all(torch.equal(v, frozen[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == table.shape[0]  # never resized
    initial = pipe.initial_embedding(settings)
    assert torch.equal(initial, table[pipe.tokenizer.encode("a", add_special_tokens=False)[0]].float())
    history = token.record["history"]
    assert history[1]["loss"] != history[0]["loss"]  # the update after epoch 0 changed the images


def test_gradient_flows_only_through_the_last_denoising_step(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        pipe.train_token("tiger cat", classifier(bias=[0, -20, 0, 0, 0]), 1, fast(max_epochs=1), progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2 * 3  # 2 images x 3 steps
    assert calls == [False, False, True] * 2


def test_token_gets_a_gradient_through_the_text_encoder(pipe):
    settings = fast(max_epochs=1)
    tokenizer, token_id, init_id = pipe._placeholder_ids(settings)
    token = torch.nn.Parameter(pipe.initial_embedding(settings))
    cond = pipe._encode(tokenizer, ["A photo of <dct> tiger cat"], token_id, init_id, token)
    z = torch.randn(1, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    image = pipe._last_step_image(z, cond, pipe._uncond(tokenizer, 1), settings)
    torch.nn.functional.cross_entropy(classifier().logits(image), torch.tensor([1])).backward()
    assert token.grad.norm().item() > 0


def test_gradient_is_clipped_after_backward(pipe, monkeypatch):
    """The authors call clip_grad_norm_ before backward, which clips nothing; here it must see the
    accumulated gradient of the epoch."""
    import pipelines.dct as dct

    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen.append((params[0].grad is not None and params[0].grad.norm().item() > 0, max_norm))
        return real(params, max_norm)

    monkeypatch.setattr(dct.torch.nn.utils, "clip_grad_norm_", spy)
    pipe.train_token("tiger cat", classifier(bias=[0, -20, 0, 0, 0]), 1, fast(max_epochs=2, max_grad_norm=0.5),
                     progress=False)
    assert seen == [(True, 0.5), (True, 0.5)]


def test_stops_when_enough_images_are_classified_as_the_target(pipe):
    settings = fast(max_epochs=10)
    token = pipe.train_token("tiger cat", classifier(bias=[0, 50, 0, 0, 0]), 1, settings, progress=False)
    assert token.record["epochs"] == 1
    assert "2 of 2 images classified as the target" in token.record["stop_reason"]
    assert token.record["best_epoch"] == 0
    assert torch.equal(token.embedding, pipe.initial_embedding(settings))  # the evaluated token, pre-update


def test_stops_after_patience_epochs_without_a_lower_loss(pipe):
    settings = fast(max_epochs=20, patience=2, epoch_size=1, min_correct=1)
    token = pipe.train_token("tiger cat", classifier(bias=[5, 0, 0, 0, 0], constant=True), 1, settings,
                             progress=False)
    assert token.record["epochs"] == 3
    assert token.record["stop_reason"] == "no lower epoch loss for 2 epochs"


def test_saved_token_reloads_and_reproduces_the_same_image(pipe, tmp_path, monkeypatch):
    settings = fast(max_epochs=1)
    guide = classifier(bias=[0, -20, 0, 0, 0])
    token, path = train_or_load_token(pipe, guide, "tiger cat", tmp_path, settings, progress=False)
    assert path.is_file() and path.suffix == ".safetensors"
    loaded = DctToken.load(path)
    assert torch.equal(loaded.embedding, token.embedding) and loaded.class_index == 1
    a = pipe.generate_with_token("tiger cat", token, [7], settings).images[0]
    b = pipe.generate_with_token("tiger cat", loaded, [7], settings).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # a rerun with the same settings reuses the finished token instead of training
    monkeypatch.setattr(DctPipeline, "train_token", lambda *a, **k: pytest.fail("retrained a finished token"))
    again, again_path = train_or_load_token(pipe, guide, "tiger cat", tmp_path, settings, progress=False)
    assert again_path == path and torch.equal(again.embedding, token.embedding)
    # other training settings are another token
    other = fast(max_epochs=1, lr=0.01)
    from pipelines.dct import token_path
    assert token_path(tmp_path, pipe, guide, 1, "tiger cat", other) != path


def test_the_token_changes_the_generated_image(pipe):
    settings = fast()
    base = pipe.initial_embedding(settings)
    moved = DctToken(base + 3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0)), "tiger cat", 1)
    a = np.asarray(pipe.generate_with_token("tiger cat", DctToken(base, "tiger cat", 1), [3], settings).images[0]).astype(int)
    b = np.asarray(pipe.generate_with_token("tiger cat", moved, [3], settings).images[0]).astype(int)
    assert np.abs(a - b).sum() > 0


def test_placeholder_must_be_new(pipe):
    with pytest.raises(ValueError, match="already a token"):
        pipe.train_token("tiger cat", classifier(), 1, fast(placeholder="cat"), progress=False)


def test_class_names_resolve_by_name_synonym_or_index():
    clf = classifier()
    assert clf.class_index("tiger cat") == 1
    assert clf.class_index("Tabby") == 0
    assert clf.class_index("tiger_cat") == 1
    assert clf.class_index(2) == 2 and clf.class_index("3") == 3
    with pytest.raises(ValueError, match="close matches: 'tiger cat'"):
        clf.class_index("tigr cat")
    with pytest.raises(ValueError, match="out of range"):
        clf.class_index(9)


def test_transformers_classifier_loads_from_a_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=5, id2label=dict(enumerate(LABELS)),
                       label2id={n: i for i, n in enumerate(LABELS)})
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    clf = load_classifier(tmp_path)
    assert clf.labels == LABELS and clf.input_size == (32, 32) and clf.kind == "transformers"
    x = torch.rand(2, 3, 48, 40, requires_grad=True)  # odd size: resized and centre-cropped
    logits = clf.logits(x)
    assert logits.shape == (2, 5)
    logits[:, 1].sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="classifier folder not found"):
        load_classifier(tmp_path / "missing")


def test_timm_classifier_loads_a_checkpoint(tmp_path):
    import timm

    model = timm.create_model("test_resnet", num_classes=5, pretrained=False)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    clf = load_classifier("timm:test_resnet", checkpoint=tmp_path / "ckpt.pth", labels=tmp_path / "labels.txt")
    assert clf.labels == LABELS and clf.kind == "timm"
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(clf.logits(x), model(clf.preprocess(x)))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_classifier("timm:test_resnet", checkpoint=tmp_path / "nope.pth", labels=LABELS)


# ---------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from pipelines.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("dct_cli")
    save_tiny_pipeline(root / "sd")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=5, id2label=dict(enumerate(LABELS)),
                       label2id={n: i for i, n in enumerate(LABELS)})
    ViTForImageClassification(config).save_pretrained(root / "clf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "clf")
    return root


def _cli(saved, out, *extra):
    from pipelines.__main__ import main

    return main(["generate", "dct", "--class-name", "tiger cat", "--classifier", str(saved / "clf"),
                 "--model", str(saved / "sd"), "--out", str(out), "--num-images", "2", "--steps", "2",
                 "--device", "cpu", "--no-progress", "--set", "max_epochs=1", "--set", "epoch_size=1",
                 "--set", "min_correct=1", *extra])


def test_cli_generates_with_a_learned_token_and_reuses_it(saved, tmp_path, monkeypatch):
    import json

    assert _cli(saved, tmp_path) == 0
    pngs = sorted(tmp_path.glob("dct-*-0000[0-9].png"))
    records = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert len(pngs) == 2 and all(r["class_index"] == 1 for r in records)
    assert "<dct> tiger cat" in records[0]["prompt_used"]
    tokens = list((tmp_path / "cache").glob("dct-tiger_cat-*.safetensors"))
    assert len(tokens) == 1 and records[0]["token_file"] == str(tokens[0])
    assert list(tmp_path.glob("dct-*.contact.png"))
    # more images later: finished ones are kept and the token is reused, not retrained
    before = {p: p.stat().st_mtime_ns for p in pngs}
    monkeypatch.setattr(DctPipeline, "train_token", lambda *a, **k: pytest.fail("retrained a finished token"))
    assert _cli(saved, tmp_path, "--num-images", "3") == 0  # argparse: the last --num-images wins
    assert {p: p.stat().st_mtime_ns for p in pngs} == before
    assert len(list(tmp_path.glob("dct-*-0000[0-9].png"))) == 3


def test_cli_unknown_class_lists_close_matches(saved, tmp_path, capsys):
    from pipelines.__main__ import main

    code = main(["generate", "dct", "--class-name", "tigger cat", "--classifier", str(saved / "clf"),
                 "--model", str(saved / "sd"), "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown class 'tigger cat'" in err and "'tiger cat'" in err


def test_a_fidelity_evaluator_can_never_guide(saved, tmp_path, capsys):
    import shutil

    from pipelines.__main__ import main
    from pipelines.classifiers import mark_as_evaluator

    judge = tmp_path / "judge"
    shutil.copytree(saved / "clf", judge)
    load_classifier(judge)  # scoring with it is fine
    mark_as_evaluator(judge)
    load_classifier(judge)
    with pytest.raises(ValueError, match="fidelity evaluator"):
        load_classifier(judge, for_guidance=True)
    with pytest.raises(ValueError, match="fidelity evaluator"):
        load_classifier("timm:test_resnet", checkpoint=judge / "model.safetensors", labels=LABELS, for_guidance=True)
    code = main(["generate", "dct", "--class-name", "tiger cat", "--classifier", str(judge),
                 "--model", str(saved / "sd"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert code == 2 and "cannot guide" in capsys.readouterr().err
