"""Claims 2-5 of issue 5 on the trained mini world: can the papers' methods make a tail concept that
plain text-to-image sampling gets wrong, from a few reference images, without collapsing or copying?

For every tail class and seed each method makes ``images_per_class`` images. A seed is a replicate:
it draws its own ``references_per_seed`` references from the class's pool (the ``references`` split),
so NAO's inversions and paths change with it, and gives every random draw its own integers. The
independent evaluator scores the images with :mod:`benchmarks.mini.metrics` (fidelity, novel fidelity,
near-copy share and nearest-reference similarity against the seed's references, nearest-neighbour
diversity); figures are averaged over the tail classes per seed, then reported as mean ± 95% Student-t
interval over seeds; a method's gain over plain sampling is paired by seed. Methods run through
``pipelines`` unchanged, with each method's ``reference`` preset (the authors' settings), the
overrides in params.yaml, then the values chosen on the validation classes (``select``,
results/mini/selection.json):

* ``sd``: plain sampling (the baseline, paired with the others by seed);
* ``seedselect``: one seed z* optimised against all references, then bootstrap-resampled short runs
  from z* (the paper's tool for many diverse images);
* ``nao-seedselect``: short SeedSelect runs from the interior points of the norm-aware paths between
  the DDIM-inverted references and their NAO centroid;
* ``dct``: a class token learned against the DCT guide classifier (never the evaluator).

Claim 3 (compute): SeedSelect from random seeds with its full budget and NAO-SeedSelect are traced
(:mod:`benchmarks.mini.trace`), giving each image after k iterations. Novel fidelity (correct and not a
near-copy) is put against the compute per image spent to get there: UNet evaluations counted from the
settings ((k + 1) renders x steps x (2 with guidance > 1, else 1), plus for NAO-SeedSelect its DDIM
inversion steps x references / images) and seconds from the unit records (the one-off work of a unit,
i.e. reference encodings, inversions and the NAO solve, spread over its images, plus the optimisation
time pro rata of renders). Claim 3 holds if NAO-SeedSelect reaches SeedSelect's final novel fidelity
(pooled over seeds) at <= 1/4 of SeedSelect's compute, in UNet evaluations and in seconds.

Generated images are kept per (method, class, seed) in ``work_dir`` under names that hash the model
files, the reference images, the generation code and the settings, written atomically: a rerun (or
an interrupted run) reuses finished units.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.intervals import format_interval, notes_for, t_interval
from pipelines.loading import load_components
from pipelines.references import load_reference_images
from pipelines.io import load_tensors, save_image, save_tensors, write_json, write_text
from pipelines.registry import get_method
from pipelines.sampling import derive_seed

from . import data
from .common import Timer
from .config import MiniConfig
from .evaluator import load_evaluator
from .metrics import diversity, fidelity, memorisation
from .trace import TracedNaoSeedSelect, TracedSeedSelect

BASELINE = "sd"
UNIT_VERSION = 4       # bump when how a unit is generated here changes (pipelines/ and trace.py are hashed)
LABELS = {"sd": "plain", "seedselect": "SeedSelect", "nao-seedselect": "NAO-SeedSelect", "dct": "DCT"}
FIGURES = ("fidelity", "novel_fidelity", "diversity", "near_copy_share", "nearest_reference_cosine",
           "nearest_reference_pixel_rmse")
SEED_STRIDE = 100_000  # image i of replicate seed s starts from integer seed s * SEED_STRIDE + i


def key_name(method: str) -> str:
    """Metric-key spelling of a method: ``sd`` is the issue's ``plain``, dashes become underscores."""
    return "plain" if method == BASELINE else method.replace("-", "_")


def fingerprint(folders) -> str:
    """sha256 over the files of the model folders: retrained models never reuse stale images."""
    h = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} is missing (run its DVC stage first)")
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "training.json"):
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha256 of the generation code (pipelines/*.py, trace.py) and UNIT_VERSION: a fixed pipeline never
    reuses images made by the broken one."""
    import pipelines

    h = hashlib.sha256(str(UNIT_VERSION).encode())
    for f in sorted(Path(pipelines.__file__).parent.glob("*.py")) + [Path(__file__).with_name("trace.py")]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def method_settings(cc, method: str, selected: dict | None = None, **extra):
    """Settings of ``method`` in the claims: its ``reference`` preset, the claims-wide sizes, the overrides,
    the values chosen on the validation classes (``selected``: setting -> value), then ``extra``."""
    values = {"num_inference_steps": cc.num_inference_steps, "batch_size": cc.batch_size, "dtype": "fp32",
              **dict(cc.methods.get(method) or {}), **dict(selected or {}), **extra}
    return get_method(method).settings("reference", "cpu", **values)


def to_u8(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def collect(pipe, *args, **kwargs) -> list:
    """Call a pipeline and return its ImageResults (tensors included, e.g. traces) in call order."""
    results = []
    pipe(*args, callback=results.append, progress=False, **kwargs)
    return sorted(results, key=lambda r: (r.concept, r.index))


def optimised(results, trace: bool) -> dict:
    """A unit from SeedSelect-type ImageResults: images, optionally their per-iteration traces, the record."""
    out = {"images": to_u8([r.image for r in results]),
           "record": {"updates": [r.record["updates"] for r in results],
                      "stop_reasons": [r.record["stop_reason"] for r in results],
                      "optimise_seconds": [r.record["seconds"] for r in results]}}
    if trace:
        out["trace"] = torch.stack([r.tensors["trace"] for r in results])
    return out


def first_reaching(curve, target: float) -> int | None:
    """First index at which ``curve`` reaches ``target`` (None: never)."""
    reached = np.nonzero(np.asarray(curve, float) >= target - 1e-9)[0]
    return int(reached[0]) if len(reached) else None


def unet_evaluations(settings, k: int, inversions_per_image: float = 0.0) -> float:
    """Forward UNet evaluations per image after k iterations: k + 1 renders of ``num_inference_steps``
    steps, two evaluations per step with classifier-free guidance, plus amortised inversion steps."""
    per_step = 2 if settings.guidance_scale > 1 else 1
    return (k + 1) * settings.num_inference_steps * per_step + inversions_per_image


def unit_seconds(unit: dict, k: int, budget: int) -> float:
    """Seconds per image after k of ``budget`` iterations, from a unit's record: its one-off work spread
    over its images, plus its optimisation time pro rata of renders."""
    rec, n = unit["record"], len(unit["images"])
    optimise = float(np.mean(rec["optimise_seconds"]))
    overhead = max(0.0, rec["seconds"] - sum(rec["optimise_seconds"])) / n
    return overhead + optimise * (k + 1) / (budget + 1)


class ClaimsRun:
    """Units of generated images for ``classes`` (default: the tail classes) under ``work_dir`` (default:
    the claims'), with the settings chosen on the validation classes (``selected``: method -> values)."""

    def __init__(self, cfg: MiniConfig, classes=None, work_dir=None, selected: dict | None = None) -> None:
        self.cfg, self.cc = cfg, cfg.claims
        self.classes = list(cfg.data.tail_classes if classes is None else classes)
        self.selected = dict(selected or {})
        unknown = sorted(set(self.cc.methods) - set(LABELS))
        if unknown:
            raise ValueError(f"mini.claims.methods: unknown method(s) {unknown}; expected some of {sorted(LABELS)}")
        if BASELINE not in self.cc.methods:
            raise ValueError(f"mini.claims.methods must include the plain baseline {BASELINE!r}")
        if not self.cc.seeds or self.cc.images_per_class < 2 or self.cc.curve_images < 1:
            raise ValueError("mini.claims needs at least one seed, 2 images per class (diversity is pairwise) and "
                             "1 curve image (SeedSelect's traced run, which also gives bootstrap its z*)")
        if "nao-seedselect" in self.cc.methods and "seedselect" not in self.cc.methods:
            raise ValueError("claim 3 compares NAO-SeedSelect with SeedSelect: list both or neither")
        folders = [cfg.sd_dir, cfg.clip_dir]
        if "dct" in self.cc.methods:
            guide = (self.cc.methods["dct"] or {}).get("classifier")
            if not guide:
                raise ValueError("mini.claims.methods.dct needs `classifier`: the folder of the DCT guide "
                                 "(a classifier other than the evaluator)")
            folders.append(Path(guide))
        self.fingerprint = fingerprint(folders)[:16]
        self.code = code_fingerprint()[:16]
        self.work = Path(self.cc.work_dir if work_dir is None else work_dir)
        self.cache = self.work / "cache" / self.fingerprint
        self.comps = load_components(cfg.sd_dir, cfg.clip_dir, device="cpu", dtype="fp32")
        self.pool = {c: load_reference_images(cfg.data_dir / "references" / cfg.class_names[c]) for c in self.classes}
        k = self.cc.references_per_seed
        small = {cfg.class_names[c]: len(p) for c, p in self.pool.items() if len(p) < k}
        if k < 2 or small:
            raise ValueError(f"mini.claims.references_per_seed = {k} needs >= 2 and at most the reference pool of "
                             f"each class (pools {small}); raise mini.data.n_references")

    def settings(self, method: str, **extra):
        return method_settings(self.cc, method, self.selected.get(method), **extra)

    def references(self, label: int, seed: int) -> list:
        """The replicate's own reference set: ``references_per_seed`` images of the class's pool, drawn by a
        generator keyed on (class, seed); a pool of exactly that size gives every seed the same set."""
        pool = self.pool[label]
        g = torch.Generator().manual_seed(derive_seed("mini-claims-references", label, seed))
        return [pool[i] for i in sorted(torch.randperm(len(pool), generator=g)[:self.cc.references_per_seed].tolist())]

    # ------------------------------------------------------------------------------------ units
    def unit_path(self, kind: str, label: int, seed: int, n: int, settings) -> Path:
        """Deterministic name hashing everything that decides the unit's images: model files, generation
        code, reference images, prompt, settings, seed and count."""
        key = hashlib.sha256(json.dumps({
            "models": self.fingerprint, "code": self.code, "kind": kind, "n": n, "seed": seed,
            "references": [r.content_hash for r in self.references(label, seed)], "prompt": self.cfg.prompt(label),
            "settings": asdict(settings)}, sort_keys=True, default=str).encode())
        return self.work / f"{kind}-{self.cfg.class_names[label]}-s{seed}-{key.hexdigest()[:16]}.safetensors"

    def unit(self, kind: str, method: str, label: int, seed: int, n: int, settings) -> dict:
        """Images (and traces) of one (method, class, seed): loaded when finished, else generated."""
        path = self.unit_path(kind, label, seed, n, settings)
        cached = load_tensors(path, "claims unit")
        if cached is not None:
            return {**cached[0], "record": json.loads(cached[1]["record"])}
        t0 = time.perf_counter()
        out = getattr(self, "_" + method.replace("-", "_"))(label, seed, n, settings)
        out["record"]["seconds"] = round(time.perf_counter() - t0 + out["record"].get("z_star_seconds", 0.0), 2)
        tensors = {k: v for k, v in out.items() if torch.is_tensor(v)}
        save_tensors(path, tensors, metadata={"record": json.dumps(out["record"])})
        return out

    def _base(self, seed: int) -> int:
        return seed * SEED_STRIDE

    def _int_seeds(self, seed: int, n: int) -> list[int]:
        return [self._base(seed) + i for i in range(n)]

    def _sd(self, label, seed, n, s) -> dict:
        pipe = get_method("sd").pipeline_cls.from_components(self.comps)
        out = pipe(self.cfg.prompt(label), num_images_per_prompt=n, seed=self._base(seed), settings=s)
        return {"images": to_u8(out.images), "record": {"updates": [0] * n}}

    def _seedselect(self, label, seed, n, s) -> dict:
        pipe = TracedSeedSelect.from_components(self.comps)
        call = dict(seed=self._base(seed), settings=s, cache_dir=self.cache)
        if not s.bootstrap:  # one budget per image: the fidelity-vs-iterations trace is comparable
            res = collect(pipe, self.cfg.prompt(label), self.references(label, seed), n, **call)
            return {**optimised(res, trace=True), "seeds": torch.stack([r.tensors["seed"] for r in res])}
        # z* (image 0: seed base+0, all references, the full budget) is exactly image 0 of the traced run
        # from random seeds, which is batched: reuse it instead of optimising it again alone
        curve = self.unit("curve", "seedselect", label, seed, self.cc.curve_images, dataclasses.replace(s, bootstrap=False))
        res = collect(pipe, self.cfg.prompt(label), self.references(label, seed), image_indices=list(range(1, n)),
                      z_star={0: curve["seeds"][0]}, **call)
        rest = optimised(res, trace=False)
        record = {k: curve["record"][k][:1] + v for k, v in rest["record"].items()}
        record["z_star_seconds"] = curve["record"]["seconds"] / self.cc.curve_images
        return {"images": torch.cat([curve["images"][:1], rest["images"]]), "record": record}

    def _nao_seedselect(self, label, seed, n, s) -> dict:
        pipe = TracedNaoSeedSelect.from_components(self.comps)
        res = collect(pipe, self.cfg.prompt(label), self.references(label, seed), n, seed=self._base(seed), settings=s,
                      cache_dir=self.cache)
        return optimised(res, trace=True)

    def _dct(self, label, seed, n, s) -> dict:
        from pipelines.classifiers import load_classifier
        from pipelines.dct import train_or_load_token

        pipe = get_method("dct").pipeline_cls.from_components(self.comps)
        name = self.cfg.class_names[label]
        classifier = load_classifier(s.classifier, s.classifier_checkpoint, s.classifier_labels, device="cpu",
                                     for_guidance=True)
        token, _ = train_or_load_token(pipe, classifier, name, self.cache, s, progress=False)
        out = pipe.generate_with_token(name, token, self._int_seeds(seed, n), s)
        rec = {k: v for k, v in token.record.items() if k in ("epochs", "stop_reason", "best_correct", "seconds")}
        return {"images": to_u8(out.images), "record": {"updates": [0] * n, "token": rec}}

    # ---------------------------------------------------------------------------------- metrics
    def references01(self, label: int, seed: int) -> torch.Tensor:
        return to_u8([r.image for r in self.references(label, seed)]).float() / 255

    def score(self, evaluator, images_u8: torch.Tensor, label: int, seed: int, real01: torch.Tensor) -> dict:
        """Every figure of one unit's images: fidelity, novel fidelity, near-copies and nearest-reference
        similarity against the seed's references (threshold from the held-out ``real01``), diversity."""
        x = images_u8.float() / 255
        mem = memorisation(evaluator, x, self.references01(label, seed), real01, self.cc.near_copy_percentile, label)
        return {"fidelity": fidelity(evaluator, x, label), "diversity": diversity(evaluator, x, real01),
                **{k: v for k, v in mem.items() if k != "near_copy"}}

    def run(self) -> dict:
        cfg, cc = self.cfg, self.cc
        timer = Timer()
        evaluator = load_evaluator(cfg.evaluator_dir)
        test_x, test_y = data.load_split(cfg.data_dir, "test")
        tail = self.classes
        real = {c: data.to_unit(test_x[test_y == c]) for c in tail}
        # (unit name, method, settings, images): each method's own images, and SeedSelect's traced run
        jobs = [(m, m, self.settings(m), cc.images_per_class) for m in cc.methods]
        if "seedselect" in cc.methods:  # first: bootstrap SeedSelect takes its z* from this run
            jobs.insert(0, ("curve", "seedselect", self.settings("seedselect", bootstrap=False), cc.curve_images))
        units = {}        # (unit name, label, seed) -> unit
        bar = tqdm(total=len(jobs) * len(tail) * len(cc.seeds), desc="mini claims")
        for name, method, settings, n in jobs:
            for seed in cc.seeds:
                for c in tail:
                    bar.set_postfix_str(f"{name} {cfg.class_names[c]} seed {seed}")
                    units[name, c, seed] = self.unit(name, method, c, seed, n, settings)
                    bar.update(1)
        bar.close()

        scores = {(m, c, s): self.score(evaluator, units[m, c, s]["images"], c, s, real[c])
                  for m in cc.methods for c in tail for s in cc.seeds}
        result: dict = {"config": asdict(cc), "tail_classes": [cfg.class_names[c] for c in tail],
                        "fingerprint": self.fingerprint, "selected": self.selected, "methods": {},
                        "near_copy_threshold": {cfg.class_names[c]: scores[BASELINE, c, cc.seeds[0]]["near_copy_threshold"]
                                                for c in tail},
                        "references": {cfg.class_names[c]: {str(s): [r.name for r in self.references(c, s)]
                                                            for s in cc.seeds} for c in tail}}
        metrics: dict = {}
        # the baseline first: every other method's gain is paired with it by seed
        for method in sorted(cc.methods, key=lambda m: m != BASELINE):
            k = key_name(method)
            per_seed = {f: [float(np.mean([scores[method, c, s][f] for c in tail])) for s in cc.seeds] for f in FIGURES}
            for f, values in per_seed.items():
                metrics[f"tail_{f}_{k}"], metrics[f"tail_{f}_{k}_ci95"] = t_interval(values)
            ups, secs = [], []
            for seed in cc.seeds:
                us = [units[method, c, seed] for c in tail]
                ups += [x for u in us for x in u["record"]["updates"]]
                secs.append(sum(u["record"]["seconds"] for u in us) / sum(len(u["images"]) for u in us))
            result["methods"][method] = {
                "label": LABELS[method], "settings": asdict(self.settings(method)), "per_seed": per_seed,
                "updates_per_image": float(np.mean(ups)), "seconds_per_image": float(np.mean(secs)),
                "per_class": {cfg.class_names[c]: {f: float(np.mean([scores[method, c, s][f] for s in cc.seeds]))
                                                   for f in FIGURES} for c in tail}}
            if method == "dct":
                result["methods"][method]["tokens"] = {cfg.class_names[c]: units["dct", c, cc.seeds[0]]
                                                       ["record"]["token"] for c in tail}
            if method != BASELINE:
                plain = result["methods"][BASELINE]["per_seed"]
                for f in ("fidelity", "novel_fidelity"):
                    gain = [a - b for a, b in zip(per_seed[f], plain[f])]
                    metrics[f"tail_{f}_{k}_minus_plain"], metrics[f"tail_{f}_{k}_minus_plain_ci95"] = t_interval(gain)
        if "nao-seedselect" in cc.methods:
            metrics.update(self._budget(units, evaluator, real, result))
        result["seconds"] = timer.seconds
        return {"metrics": metrics, "result": result, "units": units}

    def _budget(self, units, evaluator, real, result) -> dict:
        """Claim 3: novel fidelity against compute per image, SeedSelect from random seeds vs NAO-SeedSelect."""
        cc, tail = self.cc, self.classes
        settings = {"curve": self.settings("seedselect", bootstrap=False), "nao-seedselect": self.settings("nao-seedselect")}
        inversions = {"curve": 0.0, "nao-seedselect":
                      settings["nao-seedselect"].inversion_steps * cc.references_per_seed / cc.images_per_class}

        def novel_curve(name, seed):
            per_class = []
            for c in tail:
                tr = units[name, c, seed]["trace"]                  # (N, K+1, 3, H, W) uint8
                refs = self.references01(c, seed)
                per_class.append([memorisation(evaluator, tr[:, k].float() / 255, refs, real[c],
                                               cc.near_copy_percentile, c)["novel_fidelity"]
                                  for k in range(tr.shape[1])])
            return np.mean(per_class, axis=0).tolist()

        curves, evals, seconds = {}, {}, {}
        for name in settings:
            budget = units[name, tail[0], cc.seeds[0]]["trace"].shape[1] - 1
            curves[name] = [novel_curve(name, s) for s in cc.seeds]
            evals[name] = [unet_evaluations(settings[name], k, inversions[name]) for k in range(budget + 1)]
            seconds[name] = [[float(np.mean([unit_seconds(units[name, c, s], k, budget) for c in tail]))
                              for k in range(budget + 1)] for s in cc.seeds]
        # SeedSelect's final novel fidelity is one figure, pooled over seeds: per seed it rests on only
        # curve_images x tail classes images, too few to be a target
        target = float(np.mean([c[-1] for c in curves["curve"]]))
        ss_evals, ss_seconds = evals["curve"][-1], float(np.mean([s[-1] for s in seconds["curve"]]))
        reached = [first_reaching(c, target) for c in curves["nao-seedselect"]]
        budget = {"seedselect_novel_curve_per_seed": curves["curve"],
                  "nao_seedselect_novel_curve_per_seed": curves["nao-seedselect"],
                  "seedselect_unet_evaluations": evals["curve"], "nao_seedselect_unet_evaluations": evals["nao-seedselect"],
                  "seedselect_seconds_per_seed": seconds["curve"], "nao_seedselect_seconds_per_seed": seconds["nao-seedselect"],
                  "seedselect_final_novel_fidelity_pooled": target,
                  "seedselect_iterations_to_final": first_reaching(np.mean(curves["curve"], axis=0), target),
                  "nao_iterations_to_seedselect_final": reached,
                  "seedselect_budget": len(evals["curve"]) - 1, "nao_budget": len(evals["nao-seedselect"]) - 1}
        result["budget"] = budget
        out = {"seedselect_final_tail_novel_fidelity_from_random_seeds": target,
               # the curve itself, whether or not the claim holds (means over seeds)
               "novel_fidelity_vs_compute": {
                   key_name(m): {"unet_evaluations": evals[name],
                                 "seconds": np.mean(seconds[name], axis=0).round(4).tolist(),
                                 "novel_fidelity": np.mean(curves[name], axis=0).round(4).tolist()}
                   for name, m in (("curve", "seedselect"), ("nao-seedselect", "nao-seedselect"))}}
        why = ("SeedSelect from random seeds made no correct non-copy image" if target <= 0 else
               "NAO-SeedSelect did not reach SeedSelect's final novel fidelity within its budget on some seed"
               if any(k is None for k in reached) else None)
        for unit, nao, ss in (("unet", lambda s, k: evals["nao-seedselect"][k], ss_evals),
                              ("seconds", lambda s, k: seconds["nao-seedselect"][s][k], ss_seconds)):
            key = f"compute_ratio_{unit}_nao_over_seedselect"
            if why:
                out[key] = out[f"{key}_ci95"] = None
            else:
                out[key], out[f"{key}_ci95"] = t_interval([nao(i, k) / ss for i, k in enumerate(reached)])
        if why:
            budget["ratio_undefined_because"] = why
        return out


def claim_status(metrics: dict) -> list[dict]:
    """Each claim's figure, target and whether the measured mean meets it (a claim whose figure is missing
    or undefined is not met). Claims 2 and 3 count only novel images: a copy of a reference fixes nothing."""
    def at_least(key, bar):
        v = metrics.get(key)
        return v, v is not None and v >= bar

    out = []
    v, ok = at_least("head_minus_tail_fidelity_plain", 0.30)
    out.append({"claim": "1", "figure": "head − tail fidelity, plain", "value": v, "target": "≥ 30 points", "met": ok})
    if "tail_novel_fidelity_seedselect_minus_plain" in metrics:
        v, ok = at_least("tail_novel_fidelity_seedselect_minus_plain", 0.25)
        out.append({"claim": "2", "figure": "tail novel fidelity SeedSelect − plain", "value": v,
                    "target": "≥ +25 points", "met": ok})
    if "compute_ratio_unet_nao_over_seedselect" in metrics:
        ratios = [metrics.get(f"compute_ratio_{u}_nao_over_seedselect") for u in ("unet", "seconds")]
        out.append({"claim": "3", "figure": "compute (UNet evaluations, seconds) NAO-SeedSelect / SeedSelect to "
                    "SeedSelect's final novel fidelity", "value": ratios, "target": "both ≤ 0.25",
                    "met": all(r is not None and r <= 0.25 for r in ratios)})
    for k in ("seedselect", "nao_seedselect"):
        if f"tail_diversity_{k}" in metrics:
            div, share = metrics[f"tail_diversity_{k}"], metrics.get(f"tail_near_copy_share_{k}")
            out.append({"claim": "4", "figure": f"tail diversity / near-copy share, {LABELS[k.replace('_', '-')]}",
                        "value": [div, share], "target": "diversity ≥ 0.5 and near-copies ≤ 10%",
                        "met": div >= 0.5 and share is not None and share <= 0.10})
    return out


# ------------------------------------------------------------------------------------ reports
def grid(rows: list[tuple[str, torch.Tensor]], scale: int = 2):
    """PIL grid for one class: a name column, then one row per (name, uint8 images)."""
    from PIL import Image, ImageDraw

    n = max(len(imgs) for _, imgs in rows)
    size = rows[0][1].shape[-1] * scale
    pad, label_w = 2, 110
    sheet = Image.new("RGB", (label_w + n * (size + pad), len(rows) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, imgs) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), name, fill=(0, 0, 0))
        for i, im in enumerate(imgs):
            tile = Image.fromarray(im.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + i * (size + pad), y))
    return sheet


def readme(cfg: MiniConfig, metrics: dict, result: dict, plain: dict, selection: dict) -> str:
    def f(key, pct=True):
        v, ci = metrics.get(key), metrics.get(f"{key}_ci95")
        if v is None:
            return "undefined"
        return format_interval(v, ci, 100, 1) if pct else format_interval(v, ci, 1, 3)

    def met(ok):
        return "yes" if ok else "**no**"

    m, cc = metrics, cfg.claims
    shown = {"1": f"{f('head_minus_tail_fidelity_plain')} (head {f('head_fidelity_plain')}, tail "
                  f"{f('tail_fidelity_plain_check')}; {plain['config']['num_images_per_class']} images per class)",
             "2": f"{f('tail_novel_fidelity_seedselect_minus_plain')} (fidelity alone: "
                  f"{f('tail_fidelity_seedselect_minus_plain')})",
             "3": f"UNet evaluations {f('compute_ratio_unet_nao_over_seedselect', False)}, seconds "
                  f"{f('compute_ratio_seconds_nao_over_seedselect', False)}"
                  + (f" ({result['budget']['ratio_undefined_because']})" if "ratio_undefined_because"
                     in result.get("budget", {}) else "")}
    lines = [
        "# The miniature world: the long-tail failure and its fix (issue 5, re-measured under issue 12)", "",
        "Generated by `dvc repro` (stages `mini_check`, `mini_select` and `mini_claims`, `benchmarks/mini/`). Tail "
        f"classes: {', '.join(result['tail_classes'])}; {cc.images_per_class} images per tail class and method per "
        f"seed, seeds {cc.seeds}. **Intervals**: mean ± 95% Student-t interval over the seeds; a seed is a replicate "
        f"that draws its own {cc.references_per_seed} references from the class's pool of "
        f"{cfg.data.n_references} real images and its own random seeds (the models and the test images are fixed: "
        "retraining variance is not covered). Gains over plain sampling are paired by seed.", "",
        "Figures (`benchmarks/mini/metrics.py`): *fidelity*, the independent evaluator's accuracy (%); *near-copy*, "
        "an image whose nearest reference (of its seed) is closer in the evaluator's feature space than the "
        f"{cc.near_copy_percentile:g}th percentile of nearest-neighbour distances between distinct held-out real images "
        "of the class; *novel fidelity*, the share of images classified correctly and not near-copies (%); "
        "*diversity*, the mean distance to the nearest other generated image over the same for held-out real images "
        "(sets of equal size; copies score ≈ 0).", "",
        "| claim | figure | measured | target | met |", "|---|---|---|---|---|"]
    for c in claim_status(metrics):
        if c["claim"] == "4":
            k = "seedselect" if c["figure"].endswith(", " + LABELS["seedselect"]) else "nao_seedselect"
            value = f"{f(f'tail_diversity_{k}', False)} / {f(f'tail_near_copy_share_{k}')}%"
        else:
            value = shown[c["claim"]]
        lines.append(f"| {c['claim']} | {c['figure']} | {value} | {c['target']} | {met(c['met'])} |")
    if "tail_fidelity_dct" in m:
        lines.append(f"| 5 DCT | tail fidelity / diversity | {f('tail_fidelity_dct')} / "
                     f"{f('tail_diversity_dct', False)} | reported | – |")
    lines += ["", "## Per method", "",
              "Seconds per image: generation time over the run's images, one-off work (reference encodings, "
              "DDIM inversions and NAO paths, DCT token training) included once. Nearest reference: cosine "
              "similarity of evaluator features / RMS pixel distance (pixels in [0, 1]), mean over images.", "",
              "| method | fidelity % | novel fidelity % | novel − plain | near-copies % | nearest reference (cos / px) "
              "| diversity | updates / image | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        k = key_name(method)
        gain = f(f"tail_novel_fidelity_{k}_minus_plain") if method != BASELINE else "–"
        lines.append(f"| {r['label']} | {f(f'tail_fidelity_{k}')} | {f(f'tail_novel_fidelity_{k}')} | {gain} | "
                     f"{f(f'tail_near_copy_share_{k}')} | {f(f'tail_nearest_reference_cosine_{k}', False)} / "
                     f"{f(f'tail_nearest_reference_pixel_rmse_{k}', False)} | {f(f'tail_diversity_{k}', False)} | "
                     f"{r['updates_per_image']:.1f} | {r['seconds_per_image']:.2f} |")
    lines += ["", "Near-copy thresholds (feature distance): " + ", ".join(
        f"{n} {v:.3f}" for n, v in result["near_copy_threshold"].items()) + "."]
    if note := notes_for("\n".join(lines)):
        lines += ["", note]
    if "budget" in result:
        b = result["budget"]
        lines += ["", "## Novel fidelity against compute (claim 3)", "",
                  f"Novel tail fidelity (%) of the best seed after k iterations, mean over seeds, against forward UNet "
                  f"evaluations per image ((k + 1) renders x steps x (2 with guidance > 1, else 1), plus NAO-SeedSelect's "
                  f"DDIM inversion steps x references / images) and seconds per image (2 CPU cores; one-off work of a "
                  f"unit, i.e. reference encodings, inversions and the NAO solve, spread over its images, plus the "
                  f"optimisation time pro rata of renders). SeedSelect runs from random seeds ({cc.curve_images} images "
                  f"per class and seed, its full budget of {b['seedselect_budget']} iterations), NAO-SeedSelect from the "
                  f"NAO path points ({cc.images_per_class} images, budget {b['nao_budget']}). SeedSelect's final novel "
                  f"fidelity, pooled over seeds: {100 * b['seedselect_final_novel_fidelity_pooled']:.1f}%; NAO-SeedSelect "
                  f"reaches it at iteration {b['nao_iterations_to_seedselect_final']} (per seed; None: not within its "
                  "budget). The ratios' intervals reflect NAO-SeedSelect's spread over seeds (SeedSelect's side is "
                  "pooled).", ""]
        for name, curve_key, unet_key, sec_key in (
                ("SeedSelect", "seedselect_novel_curve_per_seed", "seedselect_unet_evaluations", "seedselect_seconds_per_seed"),
                ("NAO-SeedSelect", "nao_seedselect_novel_curve_per_seed", "nao_seedselect_unet_evaluations",
                 "nao_seedselect_seconds_per_seed")):
            curve, secs = np.mean(b[curve_key], axis=0), np.mean(b[sec_key], axis=0)
            lines += [f"{name}:", "", "| k | UNet evaluations | seconds | novel fidelity % |", "|---|---|---|---|"]
            lines += [f"| {k} | {b[unet_key][k]:.0f} | {secs[k]:.3f} | {100 * curve[k]:.1f} |" for k in range(len(curve))]
            lines.append("")
    lines += ["## Settings that differ from the authors'", "",
              "Each method's `reference` preset (the authors' settings), the overrides in `mini.claims.methods` "
              "(params.yaml), then the values chosen on the **validation** digits "
              f"{', '.join(selection['val_classes'])} by `python -m benchmarks.mini select` "
              "(results/mini/selection.json; never the tail digits): " + selection["criterion"], ""]
    for method in cc.methods:
        chosen = selection["chosen"].get(method, {})
        lines.append(f"- {LABELS[method]}: `{json.dumps(cc.methods[method] or {}, sort_keys=True)}`"
                     + (f"; chosen on validation: `{json.dumps(chosen, sort_keys=True)}`" if chosen else ""))
    lines += ["", "| method | candidate | validation fidelity % | novel fidelity % | near-copies % | diversity |",
              "|---|---|---|---|---|---|"]
    for row in selection["candidates"]:
        lines.append(f"| {LABELS[row['method']]} | `{json.dumps(row['values'], sort_keys=True)}` | "
                     f"{100 * row['fidelity']:.1f} | {100 * row['novel_fidelity']:.1f} | "
                     f"{100 * row['near_copy_share']:.1f} | {row['diversity']:.3f} |")
    lines += ["", f"Plain sampling of all classes (claim 1): {plain['config']}.", "",
              "Grids: `grids/<class>.png`, one row per method (the seed's references first), images evenly spaced "
              "over each method's images of seed " + str(cc.seeds[0]) + ".", ""]
    return "\n".join(lines)


def load_selection(cfg: MiniConfig) -> dict:
    path = cfg.selection_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the mini_select stage first (settings chosen on validation)")
    selection = json.loads(path.read_text())
    if "chosen" not in selection or "candidates" not in selection:
        raise ValueError(f"{path} lacks 'chosen'/'candidates': it predates this code, rerun the mini_select stage")
    return selection


def run(cfg: MiniConfig) -> dict:
    plain_path = cfg.results_dir / "plain.json"
    if not plain_path.is_file():
        raise FileNotFoundError(f"{plain_path} is missing: run the mini_check stage first (claim 1)")
    plain = json.loads(plain_path.read_text())
    needed = ("head_fidelity_plain", "head_fidelity_plain_ci95", "head_minus_tail_fidelity_plain",
              "head_minus_tail_fidelity_plain_ci95", "tail_fidelity_plain", "tail_fidelity_plain_ci95", "config")
    missing = [k for k in needed if k not in plain]
    if missing:
        raise ValueError(f"{plain_path} lacks {missing}: it predates this code, rerun the mini_check stage")
    selection = load_selection(cfg)
    claims = ClaimsRun(cfg, selected=selection["chosen"])
    out = claims.run()
    metrics = {k: plain[k] for k in ("head_fidelity_plain", "head_fidelity_plain_ci95",
                                     "head_minus_tail_fidelity_plain", "head_minus_tail_fidelity_plain_ci95")}
    metrics["tail_fidelity_plain_check"] = plain["tail_fidelity_plain"]
    metrics["tail_fidelity_plain_check_ci95"] = plain["tail_fidelity_plain_ci95"]
    metrics.update(out["metrics"])
    result = out["result"]
    result["claims"] = claim_status(metrics)
    res_dir = cfg.results_dir
    write_json(res_dir / "metrics.json", metrics)
    write_json(res_dir / "claims.json", result)
    write_text(res_dir / "README.md", readme(cfg, metrics, result, plain, selection))
    cc, seed = cfg.claims, cfg.claims.seeds[0]
    for c in claims.classes:
        rows = [("references", to_u8([r.image for r in claims.references(c, seed)]))]
        for m in cc.methods:
            images = out["units"][m, c, seed]["images"]
            # evenly spaced over all images: NAO's first indices all lie next to the centroid
            rows.append((LABELS[m], images[torch.linspace(0, len(images) - 1, cc.grid_images).round().long()]))
        save_image(res_dir / "grids" / f"{cfg.class_names[c]}.png", grid(rows))
    return {"metrics": metrics, "seconds": result["seconds"]}
