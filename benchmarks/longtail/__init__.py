"""Long-tail benchmarks (ImageNet-LT, Places-LT, or any registered one), split like
:mod:`benchmarks.fewshot`: :mod:`.registry` and :mod:`.data` (lists, checksums, images),
:mod:`.synthesis` (which classes get extra images), :mod:`.training` (timm classifiers, cross-entropy
and the logit-adjusted loss), :mod:`.evaluation` (many / medium / few accuracy, intervals over
seeds), :mod:`.reports`. Stages run as ``python -m benchmarks.longtail <stage> --params params.yaml``."""
