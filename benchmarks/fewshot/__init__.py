"""Few-shot benchmarks (CUB-200-2011, miniImageNet, CIFAR-FS, or any registered dataset), easyfsl
style: :mod:`.registry` and :mod:`.data` (datasets), :mod:`.sampling` (support sets and episodes),
:mod:`.synthesis` (images made by a pluggable generator), :mod:`.backbones` (timm backbones,
cached features), :mod:`.classifiers` (per-episode heads), :mod:`.stats` (intervals over support
sets and backbone replicates), :mod:`.reports` (tables, metrics, plots). Stages run as
``python -m benchmarks.fewshot <stage> --params params.yaml``."""
