"""The few-shot benchmark as DVC stages: download -> episodes -> synthesize -> features -> evaluate -> report.

``python -m benchmarks.fewshot <stage> --params params.yaml [--section fewshot] [--benchmark NAME]``.
Each stage reads its settings from one params.yaml section (:class:`FewShotParams`), works per
benchmark, writes its artifacts atomically under deterministic names and skips finished work.

``combine`` then writes one markdown table over all benchmarks (``combined_table``).

Layout (``D = <data_dir>/<benchmark>``, ``R = <results_dir>/<benchmark>``)::

    D/dataset/                       prepared dataset + integrity.json            (download)
    D/supports.csv, D/episodes/*.json support sets and episodes, val and test      (episodes)
    D/references/, D/synthesis.csv, D/synthetic/<method>/<class>/*.png             (synthesize)
    D/backbone/, D/features/<backbone tag>/*.safetensors                           (features)
    R/episodes.json, R/hparams.json, R/accuracy.csv                                (evaluate)
    (D/backbone/ and D/features/ hold one backbone per replicate, named by the digest of its recipe
    and seed, so replicates never share a file)
    R/accuracy.md, R/metrics.json, R/accuracy_vs_shots.png, R/samples/             (report)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import distributed
from benchmarks.fewshot import backbones as bb
from benchmarks.fewshot import classifiers as clf
from benchmarks.fewshot import data, reports, sampling, stats, synthesis
from benchmarks.fewshot.registry import BenchmarkSpec, get_benchmark
from benchmarks.mini.common import set_threads
from benchmarks.params import load_section
from benchmarks.worksharing import ClaimBoard
from pipelines.io import check_image, load_tensors, write_json

log = logging.getLogger("benchmarks.fewshot")
STAGES = ("download", "episodes", "synthesize", "features", "evaluate", "report")


@dataclass
class BackboneParams:
    name: str = "resnet18"
    pretrained: bool = False          # timm ImageNet weights instead of base-class training (leaks miniImageNet test classes)
    checkpoint: str | None = None     # existing weights (safetensors) instead of base-class training
    image_size: int = 0               # 0: the benchmark's classic resolution
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    feature_batch_size: int = 256
    num_workers: int = 0              # DataLoader workers decoding/augmenting images
    device: str = "auto"
    replicates: int = 3               # backbones trained, each with its own seed; every ± spans them (stats.py)


@dataclass
class SynthesisParams:
    methods: list[str] = field(default_factory=lambda: ["sd", "seedselect", "nao-seedselect"])
    images_per_support: int = 10      # M images per (method, class, shot, trial)
    prompt_template: str = "a photo of a {}"
    settings: dict = field(default_factory=dict)   # passed to pipelines.generate_concepts
    # extra methods: a pipeline method with overrides, e.g. {seedselect-per-concept: {method: seedselect,
    # semantic_loss: per_concept}}; list their names in `methods` to synthesise and evaluate them
    variants: dict[str, dict] = field(default_factory=dict)
    # settings chosen on validation classes by another stage ({"chosen": {method: {setting: value}}}),
    # applied on top of settings.methods, e.g. results/mini/selection.json; null: none
    selection: str | None = None
    splits: list[str] = field(default_factory=lambda: ["test"])  # add "val" to select hyper-parameters with synthetic data
    grid_images: int = 16


@dataclass
class EvaluateParams:
    heads: list[str] = field(default_factory=lambda: ["prototype", "linear"])
    linear_l2: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    linear_max_iter: int = 100
    finetune: bool = False            # also fine-tune the whole backbone per episode (slow)
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    finetune_episodes: int = 0        # 0: all test episodes
    bootstrap: int = 2000             # resamples of the cluster bootstrap over support-set trials (stats.py)


@dataclass
class FewShotParams:
    benchmarks: list[str] = field(default_factory=lambda: ["cub", "miniimagenet", "cifar-fs"])
    dataset_ids: dict[str, str] = field(default_factory=dict)   # benchmark -> hub id / local dir override
    data_dir: str = "data/fewshot"
    results_dir: str = "results"
    hf_cache_dir: str | None = None
    check_images: bool = True
    seed: int = 0
    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 15
    trials: int = 5                   # support sets drawn per (class, shot); episodes pick one of them
    val_episodes: int = 200
    test_episodes: int = 600
    backbone: BackboneParams = field(default_factory=BackboneParams)
    synthesis: SynthesisParams = field(default_factory=SynthesisParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    combined_table: str = "results/fewshot.md"
    progress: bool = True
    threads: int = 0                  # torch CPU threads; fixed (> 0), results do not depend on the machine's cores
    # prefix of the synthesize and features stages' commands in dvc.yaml, e.g. "accelerate launch --multi_gpu
    # --num_processes 8 --no_python" (synthesis shares the manifest through claim files; backbone
    # training and feature extraction run data-parallel, benchmarks/distributed.py)
    launcher: str = ""

    @property
    def methods(self) -> list[str]:
        return [synthesis.REAL_ONLY] + [m for m in self.synthesis.methods if m != synthesis.REAL_ONLY]


class Run:
    """Paths and lazily loaded state of one benchmark under one parameter set."""

    def __init__(self, p: FewShotParams, benchmark: str):
        self.p = p
        self.spec: BenchmarkSpec = get_benchmark(benchmark, hf_id=p.dataset_ids.get(benchmark))
        self.dir = Path(p.data_dir) / self.spec.name
        self.results = Path(p.results_dir) / self.spec.name
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = data.load_prepared(self.spec, self.dir / "dataset")
        return self._ds

    def image(self, row: int):
        return self.ds[int(row)]["image"]

    def episodes_path(self, split: str, shot: int) -> Path:
        return self.dir / "episodes" / f"{split}-{self.p.ways}way-{shot}shot-{self.p.queries}q.json"

    @property
    def image_size(self) -> int:
        return self.p.backbone.image_size or self.spec.image_size

    @property
    def device(self) -> str:
        d = self.p.backbone.device
        return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d

    def prompt(self, class_name: str) -> str:
        return self.p.synthesis.prompt_template.format(self.spec.display_name(class_name))

    def save_config(self, stage: str) -> None:
        if distributed.is_main():
            write_json(self.dir / "config" / f"{stage}.json",
                       {"stage": stage, "params": dataclasses.asdict(self.p), "spec": self.spec.to_json()})


# --- stages --------------------------------------------------------------------------------------

def stage_download(run: Run) -> None:
    data.prepare(run.spec, run.dir / "dataset", cache_dir=run.p.hf_cache_dir, check_images=run.p.check_images,
                 progress=run.p.progress)
    run.save_config("download")


def stage_episodes(run: Run) -> None:
    p, index = run.p, data.class_index(run.ds)
    supports = []
    for split in ("val", "test"):
        supports += sampling.draw_supports(run.spec, index, split, p.shots, p.trials, p.seed)
    sampling.write_supports(supports, run.dir / "supports.csv")
    for split, n in (("val", p.val_episodes), ("test", p.test_episodes)):
        for shot in p.shots:
            sampling.sample_episodes(run.spec, index, supports, split, p.ways, shot, p.queries, n, p.seed) \
                .save(run.episodes_path(split, shot))
    run.save_config("episodes")


def stage_synthesize(run: Run) -> None:
    supports = [s for s in sampling.read_supports(run.dir / "supports.csv") if s.split in run.p.synthesis.splits]
    refs_dir = run.dir / "references"
    data.export_images(run.ds, sorted({r for s in supports for r in s.rows}), refs_dir)
    settings = {"cache_dir": str(run.dir / "generation-cache"), "work_dir": str(run.dir / "generation-runs"),
                **run.p.synthesis.settings}
    settings = synthesis.apply_selection(settings, run.p.synthesis.selection)
    settings = synthesis.bind_class_labels(settings, sorted({run.spec.display_name(s.class_name) for s in supports}),
                                           run.dir / "class-labels.txt")
    gen = synthesis.Generation(settings, run.p.synthesis.variants)
    rows = synthesis.build_manifest(
        supports, run.p.methods, run.p.synthesis.images_per_support, run.dir / "synthetic",
        ref_paths=lambda s: [refs_dir / f"{r:07d}.png" for r in s.rows], prompt_for=run.prompt, seed=run.p.seed,
        identity=gen.identity, refs_needed=gen.refs_needed)
    synthesis.write_manifest(rows, run.dir / "synthesis.csv")
    # claims let any number of processes (accelerate launch, torchrun, Slurm tasks) share the manifest
    report = synthesis.run_manifest(rows, resolve=gen.generator, progress=run.p.progress,
                                    board=ClaimBoard(run.dir / "synthesis-claims"))
    log.info("%s: %d images made, %d already there", run.spec.name, report.made, report.skipped)
    run.save_config("synthesize")


def _backbone(run: Run, replicate: int = 0) -> tuple[torch.nn.Module, str]:
    """The backbone of ``replicate`` and a tag naming it (the feature cache is keyed by it). Trained
    backbones take the seed ``key_seed(seed, "backbone", replicate)``, which enters the file name."""
    b = run.p.backbone
    if b.pretrained or b.checkpoint:
        if b.replicates != 1:
            raise ValueError(f"backbone.replicates is {b.replicates}, but a pretrained or checkpoint backbone is one "
                             "fixed model; set replicates: 1 (its intervals then leave backbone variance out)")
        model = bb.create_backbone(b.name, pretrained=b.pretrained, checkpoint=b.checkpoint)
        tag = f"{b.name}-" + ("imagenet" if b.pretrained else f"ckpt-{bb.file_digest(b.checkpoint)}")
        return model, f"{tag}-{run.image_size}px"
    cfg = bb.TrainConfig(b.epochs, b.batch_size, b.lr, b.weight_decay, sampling.key_seed(run.p.seed, "backbone", replicate))
    recipe = {"name": b.name, "image_size": run.image_size, **dataclasses.asdict(cfg)}
    path = run.dir / "backbone" / f"{b.name}-{_digest(recipe)}.safetensors"
    if load_tensors(path, "backbone") is None:
        splits, all_labels = run.ds["split"], run.ds["label"]
        train = [i for i, s in enumerate(splits) if s == "train"]
        labels = [all_labels[i] for i in train]
        torch.manual_seed(cfg.seed)  # the initialisation: train_backbone seeds only what comes after it
        model = bb.train_backbone(bb.create_backbone(b.name), run.image, train, labels, run.image_size, cfg,
                                  device=run.device, num_workers=b.num_workers, progress=run.p.progress)
        if distributed.is_main():   # every process holds the same model; one writes it
            bb.save_backbone(model.cpu(), path, recipe)
            write_json(path.with_suffix(".json"), recipe)
        distributed.barrier()
    return bb.create_backbone(b.name, checkpoint=path), path.stem + f"-{run.image_size}px"


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _eval_rows(run: Run) -> np.ndarray:
    return np.asarray([i for i, s in enumerate(run.ds["split"]) if s in ("val", "test")])


class _RowImages:
    """Picklable ``i -> image of dataset row rows[i]`` (DataLoader workers)."""

    def __init__(self, run: Run, rows):
        self.run, self.rows = run, rows

    def __call__(self, i: int):
        return self.run.image(self.rows[i])


class _FileImages:
    def __init__(self, paths):
        self.paths = paths

    def __call__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


def _features(run: Run, backbone: tuple[torch.nn.Module, str]) -> tuple[torch.Tensor, dict[str, dict]]:
    """Real features of ``backbone`` (from :func:`_backbone`) as a (num_rows, D) table (zeros for
    unused train rows) and, per method, the synthetic features by (class, shot, trial). Computes and
    caches whatever is missing."""
    model, tag = backbone
    fdir = run.dir / "features" / tag
    b = run.p.backbone
    rows = _eval_rows(run)
    real = bb.cached_features(fdir / "real.safetensors", [str(r) for r in rows], lambda: bb.extract_features(
        model, _RowImages(run, rows), len(rows), run.image_size, b.feature_batch_size, run.device,
        f"{run.spec.name} features", b.num_workers, run.p.progress))
    table = torch.zeros(run.ds.num_rows, real.shape[1])
    table[torch.as_tensor(rows)] = real
    synth: dict[str, dict] = {}
    manifest = run.dir / "synthesis.csv"
    all_rows = synthesis.read_manifest(manifest) if manifest.is_file() else []
    for method in run.p.methods[1:]:
        groups = synthesis.images_by_support(all_rows, method)
        paths = [p for key in sorted(groups) for p in groups[key]]
        if not paths:
            raise FileNotFoundError(f"{manifest}: no synthetic images listed for method {method!r}; run the synthesize stage")
        missing = [p for p in paths if not check_image(p, "synthetic image")]
        if missing:
            raise FileNotFoundError(f"method {method!r}: {len(missing)} synthetic images missing, e.g. {missing[0]}; run the synthesize stage")
        feats = bb.cached_features(fdir / f"synthetic-{method}.safetensors", paths, lambda: bb.extract_features(
            model, _FileImages(paths), len(paths), run.image_size, b.feature_batch_size,
            run.device, f"{method} features", b.num_workers, run.p.progress))
        out, start = {}, 0
        for key in sorted(groups):
            out[key] = feats[start:start + len(groups[key])]
            start += len(groups[key])
        synth[method] = out
    return table, synth


def _replicates(run: Run) -> range:
    if run.p.backbone.replicates < 1:
        raise ValueError(f"backbone.replicates must be >= 1, got {run.p.backbone.replicates}")
    return range(run.p.backbone.replicates)


def stage_features(run: Run) -> None:
    for r in _replicates(run):
        _features(run, _backbone(run, r))
    run.save_config("features")


def stage_evaluate(run: Run) -> None:
    """Per replicate (backbone seed): hyper-parameters selected on validation episodes, then test
    accuracy per episode; then each (method, head, shot) summarised with its interval, and its gain
    over real-only paired by episode and replicate (:mod:`.stats`)."""
    p, e = run.p, run.p.evaluate
    tests = {shot: sampling.Episodes.load(run.episodes_path("test", shot)) for shot in p.shots}
    accs: dict[tuple[str, str, int], list[np.ndarray]] = {}
    hparams: dict[str, list] = {}
    tags = []
    for r in _replicates(run):
        backbone = _backbone(run, r)
        tags.append(backbone[1])
        table, synth = _features(run, backbone)
        for shot in p.shots:
            val, test = sampling.Episodes.load(run.episodes_path("val", shot)), tests[shot]
            for method in p.methods:
                s = synth.get(method)
                if s is not None and not any(k[1] == shot for k in s):
                    log.info("%s: no %d-shot images of %s (needs more references); left out", run.spec.name, shot, method)
                    continue
                s_val = s if (s is not None and "val" in p.synthesis.splits) else None
                for head in e.heads:
                    grid = [{"l2": v, "max_iter": e.linear_max_iter} for v in e.linear_l2] if head == "linear" else [{}]
                    best, val_table = clf.select_hyperparameters(run.spec, head, grid, table, val, s_val)
                    accs.setdefault((method, head, shot), []).append(
                        clf.episode_accuracies(head, table, test, s, progress=p.progress, **best))
                    hparams.setdefault(f"{method}/{head}/{shot}shot", []).append(
                        {"backbone": backbone[1], "selected": best, "validation": val_table})
                if e.finetune:
                    sub = test.head(e.finetune_episodes or len(test))
                    images = None if s is None else synthesis.images_by_support(
                        synthesis.read_manifest(run.dir / "synthesis.csv"), method)
                    accs.setdefault((method, "finetune", shot), []).append(clf.finetune_accuracies(
                        backbone[0], run.image, sub, run.image_size, images, e.finetune_steps, e.finetune_lr,
                        p.seed, run.device, p.progress))
    resampling = {}   # per shot and episode count: one for every method, head and gain
    results = []
    for (method, head, shot), values in accs.items():
        n = len(values[0])
        if (shot, n) not in resampling:
            resampling[shot, n] = stats.trial_bootstrap(
                tests[shot].head(n), e.bootstrap, sampling.key_rng(p.seed, "bootstrap", run.spec.name, shot, n))
        real = accs.get((synthesis.REAL_ONLY, head, shot))
        results.append(_row(run, method, head, shot, np.stack(values), resampling[shot, n],
                            None if method == synthesis.REAL_ONLY or real is None else np.stack(real)))
    write_json(run.results / "hparams.json", hparams)
    write_json(run.results / "episodes.json", {"backbones": tags, "accuracy": {
        f"{m}/{h}/{k}shot": np.stack(v).round(6).tolist() for (m, h, k), v in accs.items()}})
    reports.write_accuracy_csv(results, run.results / "accuracy.csv")
    run.save_config("evaluate")


def _row(run: Run, method: str, head: str, shot: int, accs: np.ndarray, boot: stats.TrialBootstrap,
         real: np.ndarray | None) -> dict:
    """``accs``, ``real``: (replicates, episodes) accuracies of the method and of real-only."""
    acc = stats.interval(accs, boot)
    row = {"benchmark": run.spec.name, "method": method, "head": head, "shot": shot, "mean": acc["mean"],
           "ci95": acc["ci95"], "gain": None, "gain_ci95": None, "episodes": acc["episodes"],
           "replicates": acc["replicates"], "trials": acc["trials"], "resamples": run.p.evaluate.bootstrap}
    if real is not None:
        gain = stats.interval(accs - real, boot)
        row.update(gain=gain["mean"], gain_ci95=gain["ci95"])
    log.info("%s %s %s %d-shot: %.2f ± %.2f", run.spec.name, method, head, shot, 100 * acc["mean"], 100 * acc["ci95"])
    return row


def stage_report(run: Run) -> None:
    rows = reports.read_accuracy_csv(run.results / "accuracy.csv")
    reports.write_report(rows, run.results, methods=run.p.methods, notes=[_backbone_note(run.p.backbone)])
    manifest = run.dir / "synthesis.csv"
    if manifest.is_file():
        by_class: dict[tuple[str, str], list[str]] = {}
        for r in synthesis.read_manifest(manifest):
            by_class.setdefault((r.method, r.class_name), []).append(r.path)
        reports.write_sample_grids(by_class, run.results / "samples", per_grid=run.p.synthesis.grid_images)


def _backbone_note(b: BackboneParams) -> str:
    if b.pretrained:
        return (f"Backbone: timm `{b.name}` with ImageNet-pretrained weights. **Warning:** ImageNet contains "
                "miniImageNet's test classes, so these numbers are not comparable with base-class training.")
    if b.checkpoint:
        return f"Backbone: timm `{b.name}` with weights from `{b.checkpoint}`."
    return (f"Backbone: timm `{b.name}` trained from scratch on the base (meta-train) classes, {b.epochs} epochs, "
            f"{b.replicates} time(s) with its own seed (replicates).")


STAGE_FUNCS = {"download": stage_download, "episodes": stage_episodes, "synthesize": stage_synthesize,
               "features": stage_features, "evaluate": stage_evaluate, "report": stage_report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + ("combine", "all"),
                        help="one stage for each benchmark; 'combine' writes the table over all benchmarks")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="fewshot", help="params.yaml section holding FewShotParams")
    parser.add_argument("--benchmark", action="append", help="only these benchmarks (default: all in params)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = load_section(FewShotParams, args.section, args.params)
    set_threads(p.threads)
    stray = sorted(set(p.dataset_ids) - set(p.benchmarks))
    if stray:
        raise ValueError(f"{args.params}: {args.section}.dataset_ids names {stray}, not in benchmarks {p.benchmarks}")
    stages = STAGES if args.stage == "all" else () if args.stage == "combine" else (args.stage,)
    for name in (args.benchmark or p.benchmarks) if stages else ():
        run = Run(p, name)
        for stage in stages:
            log.info("%s: stage %s", run.spec.name, stage)
            STAGE_FUNCS[stage](run)
    if args.stage in ("combine", "all"):
        csvs = [Path(p.results_dir) / get_benchmark(b).name / "accuracy.csv" for b in args.benchmark or p.benchmarks]
        for c in csvs:
            if not c.is_file():
                raise FileNotFoundError(f"{c} missing; run the evaluate stage for that benchmark first")
        reports.write_combined(csvs, p.combined_table, methods=p.methods)
    return 0
