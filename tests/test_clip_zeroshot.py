"""The zero-shot CLIP guide (``clip-zeroshot:<CLIP>``): a tiny CLIPModel (text + vision towers) saved
to a folder, loaded as an ``ImageClassifier`` over label names, checked against CLIP's own scores."""
import pytest
import torch
import torch.nn.functional as F

from pipelines.classifiers import (CLIP_ZEROSHOT_PREFIX, CLIP_ZEROSHOT_TEMPLATE, load_classifier,
                                   mark_as_evaluator)
from pipelines.testing import save_tiny_clip

LABELS = ["house finch", "crab", "school bus"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_logits_are_clips_scaled_cosines_and_differentiable(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    clf = load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", labels=LABELS)
    assert clf.kind == "clip-zeroshot" and clf.labels == LABELS and clf.class_index("Crab") == 1
    images = torch.rand(2, 3, 40, 48, requires_grad=True)
    logits = clf.logits(images)
    logits[:, 1].sum().backward()
    assert logits.shape == (2, 3) and images.grad.abs().sum() > 0

    clip, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        ids = tok([CLIP_ZEROSHOT_TEMPLATE.format(n) for n in LABELS], padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**ids).pooler_output)
        image = clip.visual_projection(clip.vision_model(pixel_values=clf.preprocess(images.detach())).pooler_output)
        expected = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(logits.detach(), expected)


def test_labels_name_the_classifier(clip_dir, tmp_path):
    a = load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", labels=LABELS)
    (tmp_path / "labels.txt").write_text("house finch\ncrab\n")
    b = load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", labels=tmp_path / "labels.txt")
    assert b.labels == ["house finch", "crab"] and a.source != b.source  # DCT tokens are cached by source


def test_bad_labels_and_evaluators_are_refused(clip_dir):
    with pytest.raises(ValueError, match="needs labels"):
        load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}")
    with pytest.raises(ValueError, match="repeated label names"):
        load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", labels=["crab", "Crab"])
    with pytest.raises(FileNotFoundError, match="classifier folder not found"):
        load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}-missing", labels=LABELS)
    mark_as_evaluator(clip_dir)
    try:
        with pytest.raises(ValueError, match="fidelity evaluator"):
            load_classifier(f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", labels=LABELS, for_guidance=True)
    finally:
        (clip_dir / "fidelity_evaluator.json").unlink()


def test_dct_loads_its_guide_once_per_labels_file_state(clip_dir, tmp_path):
    import os

    from pipelines.dct import DctSettings, guide_classifier

    labels = tmp_path / "labels.txt"
    labels.write_text("house finch\ncrab\n")
    s = DctSettings(classifier=f"{CLIP_ZEROSHOT_PREFIX}{clip_dir}", classifier_labels=str(labels))
    first = guide_classifier(s, "cpu")
    assert guide_classifier(s, "cpu") is first
    labels.write_text("house finch\ncrab\nschool bus\n")
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    assert guide_classifier(s, "cpu").labels == ["house finch", "crab", "school bus"]
