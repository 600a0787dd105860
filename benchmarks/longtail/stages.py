"""The long-tail benchmark as DVC stages: data -> heldout -> synthesize -> train -> evaluate -> report.

``python -m benchmarks.longtail <stage> --params params.yaml [--section longtail] [--benchmark NAME]``.
Each stage reads its settings from one params.yaml section (:class:`LongTailParams`), works per
benchmark, writes its artifacts atomically under names that encode what made them and skips
finished work.

Methods: ``real`` (the long-tailed training set alone), every method of ``synthesis.methods`` (the
real set plus the images the synthesize stage generated for the rare classes, read from its manifest)
every key of ``extra_images`` (the real set plus the images in ``<folder>/<class>/``) and, when
``heldout.images_per_class`` > 0, ``real-heldout`` (the real set plus real training images of the rare
classes that no list holds, :mod:`benchmarks.longtail.heldout`). Each method is trained with every loss and every seed;
each (method, loss, seed) is a classifier trained from scratch. The logit-adjusted loss's tau and
prior (``prior``: the label counts of all training images, or of the real ones only) are chosen from
``tau`` x ``prior`` by overall top-1 on the validation split of the first seed's classifiers (the
test split never chooses anything); the chosen pair then trains the other seeds.

Layout (``D = <data_dir>/<benchmark>``, ``R = <results_dir>/<benchmark>``)::

    D/lists/, D/images/, D/prepared/{train,val,test}.csv        downloaded train list, images extracted from tars (data)
    D/heldout/<class>/*, D/heldout/heldout.json                   unlisted real images of the rare classes (heldout)
    D/synthesis.csv, D/synthetic/<method>/<class>/*.png           the manifest and its images               (synthesize)
    D/negatives.json                                              the classes contrastive methods push from (synthesize)
    D/runs/<method>-<loss>[-tau<t>[-realprior]]-<recipe>/seed<k>/ model, predictions, resolved config           (train)
    R/accuracy.csv, R/per_class.csv, R/hparams.json                                                            (evaluate)
    R/accuracy.md, R/metrics.json, R/per_class_accuracy.png                                                    (report)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import distributed
from benchmarks.fewshot import synthesis as fewshot_synthesis
from benchmarks.fewshot.registry import UnknownNameError, unknown_error
from benchmarks.fewshot.sampling import SupportSet
from benchmarks.longtail import data, evaluation, heldout, reports, synthesis, training
from benchmarks.longtail.registry import SPLITS, LongTailSpec, get_benchmark, with_train_list
from benchmarks.mini.common import set_threads
from benchmarks.params import load_section
from benchmarks.worksharing import ClaimBoard
from pipelines.io import atomic_path, load_whole, save_tensors, write_json

log = logging.getLogger("benchmarks.longtail")
STAGES = ("data", "heldout", "synthesize", "train", "evaluate", "report")
REAL_ONLY = "real"
# whose label counts make the logit-adjusted loss's prior: every training image, generated ones included
# (Menon et al.'s training label distribution), or the real ones only (generated images then widen a rare
# class's data without shrinking its margin); listing both chooses on the validation split
PRIOR_TEXT = {"all": "all training images (generated ones included)", "real": "the real training images only"}
PRIORS = tuple(PRIOR_TEXT)
# settings that change how fast a run goes, not what it learns
_NOT_RECIPE = ("num_workers", "decode_once", "eval_batch_size", "device")


@dataclass
class LongTailParams:
    benchmarks: list[str] = field(default_factory=lambda: ["imagenet-lt"])
    image_roots: dict[str, str] = field(default_factory=dict)   # benchmark -> local copy of its source images
    train_lists: dict[str, str] = field(default_factory=dict)   # benchmark -> local copy of its train list (else the spec's)
    data_dir: str = "data/longtail"
    results_dir: str = "results"
    check_images: bool = True          # decode every listed image once in the data stage
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    losses: list[str] = field(default_factory=lambda: ["ce", "logit-adjusted"])
    tau: list[float] = field(default_factory=lambda: [1.0])     # logit-adjusted loss; > 1 value: chosen on val
    prior: list[str] = field(default_factory=lambda: ["all"])   # logit-adjusted loss (PRIORS); > 1 value: chosen on val
    extra_images: dict[str, str] = field(default_factory=dict)  # method -> folder of <class>/<image> files
    synthesis: synthesis.SynthesisParams = field(default_factory=synthesis.SynthesisParams)
    heldout: heldout.HeldoutParams = field(default_factory=heldout.HeldoutParams)
    train: training.TrainConfig = field(default_factory=training.TrainConfig)
    progress: bool = True
    # the synthesize and train stages' command prefix in dvc.yaml (e.g. accelerate launch ...): synthesis
    # shares its manifest through claim files, each classifier trains data-parallel (benchmarks/distributed.py)
    launcher: str = ""
    threads: int = 0                   # torch CPU threads; fixed (> 0): results do not depend on the machine's cores

    def __post_init__(self):
        for loss in self.losses:
            if loss not in training.LOSSES:
                raise unknown_error("unknown loss", loss, training.LOSSES)
        for prior in self.prior:
            if prior not in PRIORS:
                raise unknown_error("unknown logit-adjustment prior", prior, PRIORS)
        if not self.tau or not self.prior:
            raise ValueError("tau and prior must each list at least one value")
        if len(self.seeds) < 3 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be at least 3 distinct values (the interval is over seeds), got {self.seeds}")
        if REAL_ONLY in self.extra_images or REAL_ONLY in self.synthesis.methods:
            raise ValueError(f"extra_images / synthesis.methods: {REAL_ONLY!r} is the method without extra images")
        if heldout.METHOD in self.extra_images or heldout.METHOD in self.synthesis.methods:
            raise ValueError(f"extra_images / synthesis.methods: {heldout.METHOD!r} is the method of heldout.images_per_class")
        both = sorted(set(self.extra_images) & set(self.synthesis.methods))
        if both:
            raise ValueError(f"method {both[0]!r} is both in extra_images and in synthesis.methods")

    @property
    def methods(self) -> list[str]:
        return ([REAL_ONLY] + list(self.synthesis.methods) + sorted(self.extra_images)
                + ([heldout.METHOD] if self.heldout.images_per_class else []))


class Run:
    """Paths and lazily loaded state of one benchmark under one parameter set."""

    def __init__(self, p: LongTailParams, benchmark: str):
        self.p = p
        self.spec: LongTailSpec = with_train_list(get_benchmark(benchmark), p.train_lists.get(benchmark))
        self.dir = Path(p.data_dir) / self.spec.name
        self.results = Path(p.results_dir) / self.spec.name
        self._splits = None

    @property
    def splits(self) -> dict[str, data.Split]:
        if self._splits is None:
            self._splits = data.load_prepared(self.spec, self.dir / "prepared")
        return self._splits

    @property
    def train_counts(self) -> np.ndarray:
        return data.class_counts(self.splits["train"], len(self.spec.classes))

    def options(self, method: str, loss: str) -> list[tuple[float, str]]:
        """The (tau, prior) pairs a method's loss is selected from; cross-entropy has one, and without
        extra images the two priors are the same counts."""
        if loss != "logit-adjusted":
            return [(0.0, "all")]
        priors = ["all"] if method == REAL_ONLY else self.p.prior
        return [(t, prior) for t in self.p.tau for prior in priors]

    @property
    def manifest_path(self) -> Path:
        return self.dir / "synthesis.csv"

    def extra(self, method: str, decode: bool = False) -> dict[str, list[Path]] | None:
        """``class -> extra images`` of a method (None for real-only); ``decode``: check that the images of
        a folder (extra_images, heldout) decode, as training is about to read them."""
        if method == REAL_ONLY:
            return None
        if method in self.p.synthesis.methods:
            if not self.manifest_path.is_file():
                raise FileNotFoundError(f"{self.manifest_path}: no synthesis manifest; run the synthesize stage")
            out: dict[str, list[Path]] = {}
            for r in sorted(fewshot_synthesis.read_manifest(self.manifest_path), key=lambda r: (r.class_name, r.trial, r.image)):
                if r.method == method:
                    if not Path(r.path).is_file():
                        raise FileNotFoundError(f"{r.path}: generated image listed in {self.manifest_path} is missing; "
                                                "run the synthesize stage")
                    out.setdefault(r.class_name, []).append(Path(r.path))
            return out
        if method == heldout.METHOD:
            if not (self.heldout_dir / heldout.RECORD).is_file():
                raise FileNotFoundError(f"{self.heldout_dir}: no held-out images; run the heldout stage")
            images, hint = synthesis.images_in_folder(self.heldout_dir, self.spec.classes), "; run the heldout stage again"
        else:
            images, hint = synthesis.images_in_folder(self.p.extra_images[method], self.spec.classes), ""
        return self._decoded(images, hint) if decode else images

    def _decoded(self, images: dict[str, list[Path]], hint: str = "") -> dict[str, list[Path]]:
        """``images`` if every one decodes: a damaged file would otherwise stop training mid-epoch.
        Nothing is removed (a folder of extra images is the user's)."""
        problems = data.undecodable([p for ps in images.values() for p in ps], self.p.progress, self.spec.name)
        if problems:
            raise ValueError(problems[0] + (f" ({len(problems) - 1} more)" if len(problems) > 1 else "") + hint)
        return images

    @property
    def heldout_dir(self) -> Path:
        return self.dir / "heldout"

    @property
    def image_root(self) -> str:
        """The local copy of the benchmark's source images (``image_roots``)."""
        root = self.p.image_roots.get(self.spec.name)
        if root is None:
            raise ValueError(f"image_roots has no entry for {self.spec.name!r}: give the folder holding its source images")
        return root

    def run_dir(self, method: str, loss: str, tau: float, extra, prior: str = "all") -> Path:
        recipe = {k: v for k, v in dataclasses.asdict(self.p.train).items() if k not in _NOT_RECIPE}
        recipe.update(loss=loss, tau=tau, lists={s: self.spec.lists[s].sha256 for s in SPLITS},
                      extra=sorted((c, [p.name for p in ps]) for c, ps in (extra or {}).items()))
        if prior != "all":  # the default prior leaves the names of runs made before the setting existed
            recipe["prior"] = prior
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        la = f"-tau{tau:g}{'' if prior == 'all' else f'-{prior}prior'}" if loss == "logit-adjusted" else ""
        return self.dir / "runs" / f"{method}-{loss}{la}-{digest}"


# --- stages --------------------------------------------------------------------------------------

def stage_data(run: Run) -> None:
    data.prepare(run.spec, run.image_root, run.dir / "prepared", cache_dir=run.dir / "lists", check_images=run.p.check_images,
                 progress=run.p.progress)


def stage_heldout(run: Run) -> None:
    """Copy ``heldout.images_per_class`` unlisted real training images of each class of
    ``heldout.groups`` (an empty folder when 0: the source is not read)."""
    hp, spec = run.p.heldout, run.spec
    counts = dict(zip(spec.classes, run.train_counts.tolist()))
    wanted = synthesis.synthesis_plan(counts, hp.groups, images_per_class=hp.images_per_class,
                                      many_threshold=spec.many_shot_threshold, few_threshold=spec.few_shot_threshold)
    lists = data.read_lists(spec, cache_dir=run.dir / "lists") if wanted else {s: [] for s in SPLITS}
    keys = heldout.write_heldout(spec, lists, run.image_root if wanted else None, wanted, hp.seed, run.heldout_dir)
    log.info("%s: %d held-out real images of %d classes", spec.name, sum(map(len, keys.values())), len(keys))


def synthesis_supports(run: Run) -> tuple[list[SupportSet], dict[str, int]]:
    """The planned classes as the few-shot manifest's support sets: the references of each (from its
    training images only), shot = ``references_per_class``, trial = its contrast set (chunk); and the plan."""
    sp, spec, train = run.p.synthesis, run.spec, run.splits["train"]
    counts = dict(zip(spec.classes, run.train_counts.tolist()))
    plan = synthesis.synthesis_plan(counts, sp.groups, sp.images_per_class, sp.top_up_to,
                                    spec.many_shot_threshold, spec.few_shot_threshold)
    refs = synthesis.reference_images(train, spec.classes, sorted(plan), sp.references_per_class, sp.seed, spec.name)
    row = {p: i for i, p in enumerate(train.paths)}
    supports = [SupportSet(spec.name, "train", c, sp.references_per_class, chunk, tuple(row[p] for p in refs[c]))
                for chunk, classes in enumerate(synthesis.contrast_sets(spec.classes, plan, sp.contrast_size))
                for c in classes]
    return supports, plan


def stage_synthesize(run: Run) -> None:
    """Generate the planned images of every synthesis method through the few-shot manifest and worker
    (resumable, shared by any number of processes through claim files)."""
    sp = run.p.synthesis
    for d in ("synthetic", "generation-cache", "generation-runs"):  # the stage's outputs exist whatever it makes
        (run.dir / d).mkdir(parents=True, exist_ok=True)
    # contrast_with all: every class with training images, by the references a planned class gets
    # (an empty table otherwise: the file says what the images were pushed from)
    negatives = synthesis.reference_images(run.splits["train"], run.spec.classes, run.spec.classes,
                                           sp.references_per_class, sp.seed, run.spec.name) \
        if sp.methods and sp.contrast_with == "all" else {}
    table = fewshot_synthesis.write_negatives(run.dir / "negatives.json", [(c, r) for c, r in negatives.items() if r])
    if not sp.methods:  # an empty manifest: training adds nothing
        fewshot_synthesis.write_manifest([], run.manifest_path)
        log.info("%s: no synthesis methods", run.spec.name)
        return
    supports, plan = synthesis_supports(run)
    settings = {"cache_dir": str(run.dir / "generation-cache"), "work_dir": str(run.dir / "generation-runs"),
                **sp.settings}
    settings = fewshot_synthesis.apply_selection(settings, sp.selection)
    # a zero-shot DCT guide (classifier_labels: benchmark-classes) tells each class from all the benchmark's classes
    settings = fewshot_synthesis.bind_class_labels(settings, [run.spec.display_name(c) for c in run.spec.classes],
                                                   run.dir / "class-labels.txt")
    if negatives:
        settings["negatives"] = str(table)
    gen = fewshot_synthesis.Generation(settings, sp.variants)
    train_paths = run.splits["train"].paths
    rows = fewshot_synthesis.build_manifest(
        supports, sp.methods, lambda s: plan[s.class_name], run.dir / "synthetic",
        ref_paths=lambda s: [Path(train_paths[i]) for i in s.rows],
        prompt_for=lambda c: sp.prompt_template.format(run.spec.display_name(c)), seed=sp.seed,
        identity=gen.identity, refs_needed=gen.refs_needed)
    fewshot_synthesis.write_manifest(rows, run.manifest_path)
    report = fewshot_synthesis.run_manifest(rows, resolve=gen.generator, progress=run.p.progress,
                                            board=ClaimBoard(run.dir / "synthesis-claims"))
    log.info("%s: %d classes planned (%d images each method), %d images made, %d already there", run.spec.name,
             len(plan), sum(plan.values()), report.made, report.skipped)


def _train_one(run: Run, out: Path, paths, labels, loss: str, tau: float, seed: int,
               prior: str = "all") -> dict[str, np.ndarray]:
    """Predictions on val and test of the classifier (method, loss, tau, prior, seed); trains it unless done."""
    preds_path = out / f"seed{seed}" / "predictions.npz"
    preds = load_whole(preds_path, _load_predictions, "predictions")
    if preds is None:
        cfg = run.p.train
        model = training.train_classifier(paths, labels, len(run.spec.classes), cfg, loss, seed, tau,
                                          state_path=out / f"seed{seed}" / "state.pt", progress=run.p.progress,
                                          prior_counts=run.train_counts if prior == "real" else None)
        preds = {s: training.predict(model, run.splits[s].paths, cfg, run.p.progress) for s in ("val", "test")}
        if not distributed.is_main():   # every process holds the same model and predictions; the first writes
            distributed.barrier()
            return preds
        save_tensors(out / f"seed{seed}" / "model.safetensors", dict(model.state_dict()),
                     metadata={"model": cfg.model, "num_classes": str(len(run.spec.classes))})
        write_json(out / f"seed{seed}" / "config.json",
                   {"benchmark": run.spec.name, "loss": loss, "tau": tau, "prior": prior, "seed": seed, "train": dataclasses.asdict(cfg),
                    "train_images": len(paths), "real_train_images": len(run.splits["train"].paths)})
        with atomic_path(preds_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **preds)
        (out / f"seed{seed}" / "state.pt").unlink(missing_ok=True)  # the finished model replaces the resume point
        distributed.barrier()
    return preds


def _load_predictions(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:  # reading every member checks the zip CRCs
        return {k: z[k] for k in z.files}


def _selection(run: Run, val_preds: dict[tuple[float, str], np.ndarray]) -> tuple[tuple[float, str], list[dict]]:
    """The (tau, prior) with the best overall top-1 on the validation split (first of equals)."""
    table = [{"tau": t, "prior": prior, "val_overall": float((preds == run.splits["val"].labels).mean())}
             for (t, prior), preds in val_preds.items()]
    best = max(table, key=lambda r: r["val_overall"])
    return (best["tau"], best["prior"]), table


def _method_loss(run: Run, method: str, loss: str, train: bool) -> tuple[tuple[float, str], list[dict], dict[int, dict]]:
    """(chosen (tau, prior), validation table, predictions per seed) of one method and loss, training
    what is missing if ``train`` (else a missing run is an error)."""
    extra = run.extra(method, decode=train)   # evaluating reads predictions, not images
    real = run.splits["train"]
    paths, labels = training.training_items(real.paths, real.labels, run.spec.classes, extra)

    def preds(option: tuple[float, str], seed: int) -> dict[str, np.ndarray]:
        tau, prior = option
        out = run.run_dir(method, loss, tau, extra, prior)
        if not train and not (out / f"seed{seed}" / "predictions.npz").is_file():
            raise FileNotFoundError(f"{out}/seed{seed}: no predictions; run the train stage")
        return _train_one(run, out, paths, labels, loss, tau, seed, prior)

    first = run.p.seeds[0]
    val = {o: preds(o, first)["val"] for o in run.options(method, loss)}
    chosen, table = _selection(run, val)
    return chosen, table, {s: preds(chosen, s) for s in run.p.seeds}


def stage_train(run: Run) -> None:
    for method in run.p.methods:
        for loss in run.p.losses:
            (tau, prior), _, _ = _method_loss(run, method, loss, train=True)
            log.info("%s: %s / %s trained (tau %g, prior %s), seeds %s", run.spec.name, method, loss, tau, prior,
                     run.p.seeds)


def stage_evaluate(run: Run) -> None:
    spec, test = run.spec, run.splits["test"]
    counts = run.train_counts
    groups = evaluation.shot_groups(counts, spec.many_shot_threshold, spec.few_shot_threshold)
    rows, class_rows, hparams = [], [], {}
    for method in run.p.methods:
        for loss in run.p.losses:
            (tau, prior), table, preds = _method_loss(run, method, loss, train=False)
            per_seed = {s: evaluation.shot_accuracies(preds[s]["test"], test.labels, counts, spec.many_shot_threshold,
                                                      spec.few_shot_threshold) for s in run.p.seeds}
            summary = evaluation.summarise(per_seed)
            rows += reports.accuracy_rows(spec.name, method, loss, summary)
            per_class = np.mean([evaluation.per_class_accuracy(preds[s]["test"], test.labels, len(spec.classes))
                                 for s in run.p.seeds], axis=0)
            class_rows += [{"benchmark": spec.name, "method": method, "loss": loss, "class_name": c,
                            "train_images": int(counts[i]), "group": groups[i], "accuracy": float(per_class[i])}
                           for i, c in enumerate(spec.classes)]
            if loss == "logit-adjusted":
                hparams[f"{method}/{loss}"] = {"selected": {"tau": tau, "prior": prior}, "selected_on": "val split, overall top-1, "
                                               f"seed {run.p.seeds[0]}", "validation": table}
            log.info("%s %s %s: overall %.2f ± %.2f, few %.2f ± %.2f", spec.name, method, loss,
                     100 * summary["overall"]["mean"], 100 * summary["overall"]["ci95"],
                     100 * summary["few"]["mean"], 100 * summary["few"]["ci95"])
    reports.write_accuracy_csv(rows, run.results / "accuracy.csv")
    reports.write_class_csv(class_rows, run.results / "per_class.csv")
    write_json(run.results / "hparams.json", hparams)


def _la_note(p: LongTailParams) -> str:
    tau = f"tau from {list(p.tau)}" if len(p.tau) > 1 else f"tau {p.tau[0]:g}"
    prior = " or ".join(PRIOR_TEXT[x] for x in p.prior)
    chosen = ", both chosen" if len(p.tau) > 1 and len(p.prior) > 1 else ", chosen" if len(p.tau) + len(p.prior) > 2 else ""
    return (f"Logit adjustment: {tau}; prior from the label counts of {prior}{chosen}"
            f"{' on the validation split (hparams.json)' if chosen else ''}.")


def stage_report(run: Run) -> None:
    rows = reports.read_accuracy_csv(run.results / "accuracy.csv")
    class_rows = reports.read_class_csv(run.results / "per_class.csv")
    t = run.p.train
    notes = [
        f"Classifier: timm `{t.model}`{' (ImageNet-pretrained)' if t.pretrained else ' from scratch'}, {t.epochs} epoch{'s' if t.epochs != 1 else ''}, "
        f"batch {t.batch_size}, SGD lr {t.lr}{f' (backbone {t.backbone_lr})' if t.backbone_lr is not None else ''}, "
        f"{t.schedule} schedule, weight decay {t.weight_decay}, {t.image_size} px.",
        f"Shot groups by real training images (classifier-balancing's `shot_acc`): many > {run.spec.many_shot_threshold}, "
        f"few < {run.spec.few_shot_threshold}, medium otherwise; a group's accuracy is the mean of its classes'. "
        "The interval resamples only the training seed (each seed a classifier trained from scratch); the test set is fixed.",
        "Losses: `ce` = cross-entropy; `logit-adjusted` = Menon et al. 2021 (tau = 1 is Balanced Softmax). " + _la_note(run.p)]
    sp = run.p.synthesis
    if sp.methods:
        amount = f"{sp.images_per_class} generated images each" if sp.images_per_class is not None \
            else f"generated images up to {sp.top_up_to} in all"
        notes.append(f"Generated images ({', '.join(f'`{m}`' for m in sp.methods)}): the {' + '.join(sp.groups)}-shot classes get "
                     f"{amount}, from up to {sp.references_per_class} references drawn from the class's own training images; "
                     f"classes are generated in contrast sets of up to {sp.contrast_size} (SeedSelect's contrastive loss)"
                     + ("; every other class of the benchmark enters that loss as a negative (the centroid of its own "
                        "training references)." if sp.contrast_with == "all" else "."))
    if run.p.heldout.images_per_class:
        notes.append(f"`{heldout.METHOD}`: the real training set plus {run.p.heldout.images_per_class} real training images "
                     f"of each {' + '.join(run.p.heldout.groups)}-shot class that no list holds (chosen by a keyed hash, "
                     f"{run.heldout_dir / heldout.RECORD}): what new real images buy, the bar for generated ones.")
    for method, folder in sorted(run.p.extra_images.items()):
        counts = {c: len(ps) for c, ps in synthesis.images_in_folder(folder, run.spec.classes).items() if ps}
        amount = f"{next(iter(counts.values()))} each" if len(set(counts.values())) == 1 else "; ".join(f"{c} {n}" for c, n in counts.items())
        notes.append(f"`{method}`: the real training set plus the images in `{folder}/<class>/` for {len(counts)} "
                     f"class{'es' if len(counts) != 1 else ''} ({', '.join(counts)}: {amount}).")
    reports.write_report(rows, class_rows, run.results, run.spec.many_shot_threshold, run.spec.few_shot_threshold,
                         methods=run.p.methods, notes=notes)


STAGE_FUNCS = {"data": stage_data, "heldout": stage_heldout, "synthesize": stage_synthesize, "train": stage_train, "evaluate": stage_evaluate, "report": stage_report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longtail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + ("all",))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="longtail", help="params.yaml section holding LongTailParams")
    parser.add_argument("--benchmark", action="append", help="only these benchmarks (default: all in params)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        p = load_section(LongTailParams, args.section, args.params)
        set_threads(p.threads)
        for name in args.benchmark or p.benchmarks:
            run = Run(p, name)
            for stage in STAGES if args.stage == "all" else (args.stage,):
                log.info("%s: stage %s", run.spec.name, stage)
                STAGE_FUNCS[stage](run)
    except (FileNotFoundError, UnknownNameError, ValueError, ConnectionError) as e:  # bad input: one line, exit 2
        parser.exit(2, f"error: {e}\n")
    return 0
