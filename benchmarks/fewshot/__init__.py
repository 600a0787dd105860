"""Few-shot benchmarks (CUB-200-2011, miniImageNet, CIFAR-FS, or any registered dataset), easyfsl
style: :mod:`.registry` and :mod:`.data` (datasets), :mod:`.sampling` (support sets and episodes),
:mod:`.synthesis` (images made by a pluggable generator), :mod:`.classifiers` (timm backbones,
cached features, per-episode heads), :mod:`.reports` (tables, metrics, plots). Stages run as
``python -m benchmarks.fewshot <stage> --params params.yaml``."""
