"""One run of feature extraction, backbone training and long-tail classifier training on tiny data, as
``python tests/data_parallel_worker.py OUT NUM_WORKERS EPOCHS`` in one process or under a launcher (the data-parallel
rehearsal of tests/test_data_parallel.py). The first process saves what every process computed to OUT."""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from benchmarks import distributed
from benchmarks.fewshot import backbones as bb
from benchmarks.longtail import training

ROWS, SIZE = 41, 32   # 41 rows in batches of 11: the last global batch (8) splits unevenly too


class DigitImages:
    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray((self.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((SIZE, SIZE))


def main(out: Path, num_workers: int, epochs: int) -> None:
    torch.set_num_threads(1)
    digits = load_digits()
    images, labels = DigitImages(digits.images[:ROWS]), [int(y) % 4 for y in digits.target[:ROWS]]
    torch.manual_seed(0)
    model = bb.create_backbone("test_resnet")
    features = bb.extract_features(model, images, ROWS, SIZE, batch_size=7, num_workers=num_workers, progress=False)
    torch.manual_seed(1)
    cfg = bb.TrainConfig(epochs=epochs, batch_size=11, lr=0.05, seed=1)
    backbone = bb.create_backbone("test_resnet")
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    trained = bb.train_backbone(backbone, images, range(ROWS), labels, SIZE, cfg,
                                num_workers=num_workers, progress=False)
    trained_features = bb.extract_features(trained, images, ROWS, SIZE, batch_size=7, progress=False)
    folder = out.parent / "images"
    paths = [str(folder / f"{i:03d}.png") for i in range(ROWS)]
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(paths):
            images(i).save(p)
    distributed.barrier()
    lt = training.TrainConfig(model="test_resnet", image_size=SIZE, epochs=2, batch_size=11, lr=0.05, amp=False,
                              num_workers=num_workers, eval_batch_size=9, device="cpu", hflip=False)
    classifier = training.train_classifier(paths, np.asarray(labels), 4, lt, "logit-adjusted", seed=2, progress=False)
    predictions = torch.as_tensor(training.predict(classifier, paths, lt, progress=False))
    with torch.no_grad():
        logits = classifier(torch.stack([training.transforms(lt, train=False)(images(i)) for i in range(ROWS)]))
    if distributed.is_main():
        torch.save({"features": features, "initial_backbone": initial, "backbone": trained.state_dict(),
                    "trained_features": trained_features,
                    "classifier": classifier.state_dict(), "logits": logits, "predictions": predictions,
                    "world_size": distributed.world_size()}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
