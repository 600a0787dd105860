"""Claims 2-5 of issue 5 on the trained mini world: can the papers' methods make a tail concept that
plain text-to-image sampling gets wrong, from its 5 reference images, without collapsing?

For every tail class and seed each method makes ``images_per_class`` images; the independent
evaluator scores them (fidelity: its accuracy; diversity: mean pairwise feature distance over the
same for the class's held-out real images); figures are averaged over the tail classes per seed,
then reported as mean ± 95% interval over seeds. Methods run through ``pipelines`` unchanged, with
each method's ``reference`` preset (the authors' settings) plus the overrides in params.yaml:

* ``sd``: plain sampling (the baseline, paired with the others by seed);
* ``seedselect``: one seed z* optimised against all references, then bootstrap-resampled short runs
  from z* (the paper's tool for many diverse images);
* ``nao-seedselect``: short SeedSelect runs from the interior points of the norm-aware paths between
  the DDIM-inverted references and their NAO centroid;
* ``dct``: a class token learned against the DCT guide classifier (never the evaluator).

Claim 3 (optimisation budget): SeedSelect from random seeds with its full budget and NAO-SeedSelect
are traced (:mod:`benchmarks.mini.trace`), giving tail fidelity after k iterations;
``iterations_ratio_nao_over_seedselect`` = the iterations NAO-SeedSelect needs (per seed) to reach
SeedSelect's final tail fidelity (pooled over seeds) / the iterations SeedSelect's pooled curve needs.

Generated images are kept per (method, class, seed) in ``work_dir`` under names that hash the model
files, the reference images, the generation code and the settings, written atomically: a rerun (or
an interrupted run) reuses finished units.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.loading import load_components
from pipelines.references import load_reference_images
from pipelines.io import load_tensors, save_image, save_tensors, write_json, write_text
from pipelines.registry import get_method

from . import data
from .common import Timer
from .config import MiniConfig
from .evaluator import load_evaluator
from .metrics import ci95, diversity, fidelity
from .trace import TracedNaoSeedSelect, TracedSeedSelect

BASELINE = "sd"
UNIT_VERSION = 3       # bump when how a unit is generated here changes (pipelines/ and trace.py are hashed)
LABELS = {"sd": "plain", "seedselect": "SeedSelect", "nao-seedselect": "NAO-SeedSelect", "dct": "DCT"}
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


def method_settings(cc, method: str, **extra):
    """Settings of ``method`` in the claims: its ``reference`` preset, the claims-wide sizes, the overrides."""
    values = {"num_inference_steps": cc.num_inference_steps, "batch_size": cc.batch_size, "dtype": "fp32",
              **dict(cc.methods.get(method) or {}), **extra}
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
                      "stop_reasons": [r.record["stop_reason"] for r in results]}}
    if trace:
        out["trace"] = torch.stack([r.tensors["trace"] for r in results])
    return out


def iterations_to_reach(seedselect_curve, nao_curve) -> tuple[int, int | None]:
    """Iterations SeedSelect needs to first reach its own final fidelity, and NAO-SeedSelect to reach
    that same fidelity (None: not within its budget). Curves: fidelity after k = 0, 1, ... iterations."""
    ss, nao = np.asarray(seedselect_curve, float), np.asarray(nao_curve, float)
    target = ss[-1] - 1e-9
    reached = np.nonzero(nao >= target)[0]
    return int(np.argmax(ss >= target)), (int(reached[0]) if len(reached) else None)


class ClaimsRun:
    def __init__(self, cfg: MiniConfig) -> None:
        self.cfg, self.cc = cfg, cfg.claims
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
        self.work = Path(self.cc.work_dir)
        self.cache = self.work / "cache" / self.fingerprint
        self.comps = load_components(cfg.sd_dir, cfg.clip_dir, device="cpu", dtype="fp32")
        self.refs = {c: load_reference_images(cfg.data_dir / "references" / cfg.class_names[c])
                     for c in cfg.data.tail_classes}

    def settings(self, method: str, **extra):
        return method_settings(self.cc, method, **extra)

    # ------------------------------------------------------------------------------------ units
    def unit_path(self, kind: str, label: int, seed: int, n: int, settings) -> Path:
        """Deterministic name hashing everything that decides the unit's images: model files, generation
        code, reference images, prompt, settings, seed and count."""
        key = hashlib.sha256(json.dumps({
            "models": self.fingerprint, "code": self.code, "kind": kind, "n": n, "seed": seed,
            "references": [r.content_hash for r in self.refs[label]], "prompt": self.cfg.prompt(label),
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
            res = collect(pipe, self.cfg.prompt(label), self.refs[label], n, **call)
            return {**optimised(res, trace=True), "seeds": torch.stack([r.tensors["seed"] for r in res])}
        # z* (image 0: seed base+0, all references, the full budget) is exactly image 0 of the traced run
        # from random seeds, which is batched: reuse it instead of optimising it again alone
        curve = self.unit("curve", "seedselect", label, seed, self.cc.curve_images, dataclasses.replace(s, bootstrap=False))
        res = collect(pipe, self.cfg.prompt(label), self.refs[label], image_indices=list(range(1, n)),
                      z_star={0: curve["seeds"][0]}, **call)
        rest = optimised(res, trace=False)
        record = {k: curve["record"][k][:1] + v for k, v in rest["record"].items()}
        record["z_star_seconds"] = curve["record"]["seconds"] / self.cc.curve_images
        return {"images": torch.cat([curve["images"][:1], rest["images"]]), "record": record}

    def _nao_seedselect(self, label, seed, n, s) -> dict:
        pipe = TracedNaoSeedSelect.from_components(self.comps)
        res = collect(pipe, self.cfg.prompt(label), self.refs[label], n, seed=self._base(seed), settings=s,
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
    def run(self) -> dict:
        cfg, cc = self.cfg, self.cc
        timer = Timer()
        evaluator = load_evaluator(cfg.evaluator_dir)
        test_x, test_y = data.load_split(cfg.data_dir, "test")
        tail = list(cfg.data.tail_classes)
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

        def images01(u):
            return u["images"].float() / 255

        fid_of = {(m, c, s): fidelity(evaluator, images01(units[m, c, s]), c)
                  for m in cc.methods for c in tail for s in cc.seeds}
        result: dict = {"config": asdict(cc), "tail_classes": [cfg.class_names[c] for c in tail],
                        "fingerprint": self.fingerprint, "methods": {}}
        metrics: dict = {}
        # the baseline first: every other method's gain is paired with it by seed
        for method in sorted(cc.methods, key=lambda m: m != BASELINE):
            fid, div, ups, secs = [], [], [], []
            for seed in cc.seeds:
                us = [units[method, c, seed] for c in tail]
                fid.append(float(np.mean([fid_of[method, c, seed] for c in tail])))
                div.append(float(np.mean([diversity(evaluator, images01(u), real[c]) for u, c in zip(us, tail)])))
                ups += [x for u in us for x in u["record"]["updates"]]
                secs.append(sum(u["record"]["seconds"] for u in us) / sum(len(u["images"]) for u in us))
            k = key_name(method)
            for name, values in (("fidelity", fid), ("diversity", div)):
                metrics[f"tail_{name}_{k}"], metrics[f"tail_{name}_{k}_ci95"] = ci95(values)
            result["methods"][method] = {
                "label": LABELS[method], "settings": asdict(self.settings(method)), "per_seed_fidelity": fid,
                "per_seed_diversity": div, "updates_per_image": float(np.mean(ups)),
                "seconds_per_image": float(np.mean(secs)),
                "per_class_fidelity": {cfg.class_names[c]: float(np.mean([fid_of[method, c, s] for s in cc.seeds]))
                                       for c in tail}}
            if method == "dct":
                result["methods"][method]["tokens"] = {cfg.class_names[c]: units["dct", c, cc.seeds[0]]
                                                       ["record"]["token"] for c in tail}
            if method != BASELINE:
                plain = result["methods"][BASELINE]["per_seed_fidelity"]
                gain = [a - b for a, b in zip(fid, plain)]
                metrics[f"tail_fidelity_{k}_minus_plain"], metrics[f"tail_fidelity_{k}_minus_plain_ci95"] = ci95(gain)
        if "nao-seedselect" in cc.methods:
            metrics.update(self._budget(units, evaluator, tail, result))
        result["seconds"] = timer.seconds
        return {"metrics": metrics, "result": result, "units": units}

    def _budget(self, units, evaluator, tail, result) -> dict:
        """Claim 3: tail fidelity after k iterations (best seed so far), SeedSelect vs NAO-SeedSelect."""
        def curve(name, seed):
            per_class = []
            for c in tail:
                tr = units[name, c, seed]["trace"]                  # (N, K+1, 3, H, W) uint8
                per_class.append([fidelity(evaluator, tr[:, k].float() / 255, c) for k in range(tr.shape[1])])
            return np.mean(per_class, axis=0)

        curves = {"seedselect": [], "nao-seedselect": []}
        for seed in self.cc.seeds:
            curves["seedselect"].append(curve("curve", seed).tolist())
            curves["nao-seedselect"].append(curve("nao-seedselect", seed).tolist())
        # SeedSelect's final tail fidelity is one figure, pooled over seeds: per seed it rests on only
        # curve_images x tail classes images, too few to be a target (16/16 on one seed is chance)
        ss_pooled = np.mean(curves["seedselect"], axis=0)
        k_ss = iterations_to_reach(ss_pooled, ss_pooled)[0]
        ratios, nao_iters = [], []
        for nao in curves["nao-seedselect"]:
            k_nao = iterations_to_reach(ss_pooled, nao)[1]
            nao_iters.append(k_nao)
            # k_ss == 0: SeedSelect's optimisation gained nothing, so the ratio is undefined
            ratios.append(k_nao / k_ss if k_nao is not None and k_ss > 0 else math.nan)
        result["budget"] = {"seedselect_curve_per_seed": curves["seedselect"],
                            "nao_seedselect_curve_per_seed": curves["nao-seedselect"],
                            "seedselect_final_pooled": float(ss_pooled[-1]),
                            "seedselect_iterations_to_final": k_ss,
                            "nao_iterations_to_seedselect_final": nao_iters,
                            "seedselect_budget": len(ss_pooled) - 1,
                            "nao_budget": len(curves["nao-seedselect"][0]) - 1}
        out = {"seedselect_final_tail_fidelity_from_random_seeds": float(ss_pooled[-1])}
        if any(math.isnan(r) for r in ratios):
            out["iterations_ratio_nao_over_seedselect"] = None
            out["iterations_ratio_nao_over_seedselect_ci95"] = None
            result["budget"]["ratio_undefined_because"] = (
                "SeedSelect's pooled curve starts at its final fidelity (its optimisation gained nothing)"
                if k_ss == 0
                else "NAO-SeedSelect did not reach SeedSelect's final fidelity within its budget on some seed")
        else:
            out["iterations_ratio_nao_over_seedselect"], out["iterations_ratio_nao_over_seedselect_ci95"] = ci95(ratios)
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


def readme(cfg: MiniConfig, metrics: dict, result: dict, plain: dict) -> str:
    def f(key, pct=True):
        v, ci = metrics.get(key), metrics.get(f"{key}_ci95")
        if v is None:
            return "not reached"
        return f"{100 * v:.1f} ± {100 * ci:.1f}" if pct else f"{v:.3f} ± {ci:.3f}"

    def met(ok):
        return "yes" if ok else "**no**"

    m, cc = metrics, cfg.claims
    lines = [
        "# The miniature world: the long-tail failure and its fix (issue 5)", "",
        "Generated by `dvc repro` (stages `mini_check` and `mini_claims`, `benchmarks/mini/`). Tail classes: "
        f"{', '.join(result['tail_classes'])}; {cc.images_per_class} images per tail class and method, seeds "
        f"{cc.seeds}; mean ± 95% interval over seeds (Student t). Fidelity: the independent evaluator's accuracy "
        "(%); diversity: mean pairwise distance in the evaluator's feature space over the same for held-out real "
        "images of the class.", "",
        "| claim | figure | measured | target | met |", "|---|---|---|---|---|",
        f"| 1 long-tail failure | head − tail fidelity, plain | {f('head_minus_tail_fidelity_plain')} "
        f"(head {f('head_fidelity_plain')}, tail {f('tail_fidelity_plain_check')}; all ten digits, "
        f"{plain['config']['num_images_per_class']} images each) | ≥ 30 | "
        f"{met(m['head_minus_tail_fidelity_plain'] >= 0.30)} |"]
    if "tail_fidelity_seedselect_minus_plain" in m:
        lines.append(f"| 2 SeedSelect fixes it | tail fidelity SeedSelect − plain | "
                     f"{f('tail_fidelity_seedselect_minus_plain')} | ≥ 25 | "
                     f"{met(m['tail_fidelity_seedselect_minus_plain'] >= 0.25)} |")
    if "iterations_ratio_nao_over_seedselect" in m:
        r = m["iterations_ratio_nao_over_seedselect"]
        shown = f('iterations_ratio_nao_over_seedselect', pct=False) if r is not None else \
            "undefined: " + result["budget"].get("ratio_undefined_because", "")
        lines.append(f"| 3 NAO is faster | iterations NAO-SeedSelect / SeedSelect to SeedSelect's final tail "
                     f"fidelity | {shown} | ≤ 0.25 | "
                     f"{met(r is not None and r <= 0.25)} |")
    for k in ("seedselect", "nao_seedselect"):
        if f"tail_diversity_{k}" in m:
            lines.append(f"| 4 no collapse | tail diversity {k.replace('_', '-')} | {f(f'tail_diversity_{k}', False)} "
                         f"| ≥ 0.5 | {met(m[f'tail_diversity_{k}'] >= 0.5)} |")
    if "tail_fidelity_dct" in m:
        lines.append(f"| 5 DCT | tail fidelity / diversity | {f('tail_fidelity_dct')} / "
                     f"{f('tail_diversity_dct', False)} | reported | – |")
    lines += ["", "## Per method", "",
              "Seconds per image: generation time over the run's images, one-off work (reference encodings, "
              "DDIM inversions and NAO paths, DCT token training) included once.", "",
              "| method | tail fidelity % | − plain | tail diversity | optimiser updates / image | s / image (2 CPU cores) |",
              "|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        k = key_name(method)
        gain = f(f"tail_fidelity_{k}_minus_plain") if method != BASELINE else "–"
        lines.append(f"| {r['label']} | {f(f'tail_fidelity_{k}')} | {gain} | {f(f'tail_diversity_{k}', False)} | "
                     f"{r['updates_per_image']:.1f} | {r['seconds_per_image']:.2f} |")
    if "budget" in result:
        b = result["budget"]
        ss = np.mean(b["seedselect_curve_per_seed"], axis=0)
        nao = np.mean(b["nao_seedselect_curve_per_seed"], axis=0)
        lines += ["", "## Optimisation budget (claim 3)", "",
                  f"Tail fidelity (%) of the best seed after k iterations, mean over seeds: SeedSelect from random "
                  f"seeds ({cc.curve_images} images per class and seed, its full budget of {b['seedselect_budget']}) "
                  f"and NAO-SeedSelect from the NAO path points ({cc.images_per_class} images, budget "
                  f"{b['nao_budget']}). SeedSelect's final tail fidelity, pooled over seeds: "
                  f"{100 * b['seedselect_final_pooled']:.1f}%, first reached by its pooled curve at iteration "
                  f"{b['seedselect_iterations_to_final']}; NAO-SeedSelect reaches it at iteration "
                  f"{b['nao_iterations_to_seedselect_final']} (per seed; None: not within its budget). The interval of the "
                  f"ratio reflects NAO-SeedSelect's spread over seeds only (SeedSelect's side is pooled).",
                  "", "| k | " + " | ".join(str(k) for k in range(len(ss))) + " |",
                  "|---|" + "---|" * len(ss),
                  "| SeedSelect | " + " | ".join(f"{100 * v:.0f}" for v in ss) + " |",
                  "| NAO-SeedSelect | " + " | ".join(f"{100 * v:.0f}" for v in nao) + " |"]
    lines += ["", "## Settings", "",
              "Each method's `reference` preset (the authors' settings) with these overrides "
              "(`mini.claims.methods` in params.yaml):", ""]
    for method in cc.methods:
        lines.append(f"- {LABELS[method]}: `{json.dumps(cc.methods[method] or {}, sort_keys=True)}`")
    lines += ["", f"Plain sampling of all classes (claim 1): {plain['config']}.", "",
              "Grids: `grids/<class>.png`, one row per method (references first), images evenly spaced over "
              "each method's images of seed " + str(cc.seeds[0]) + ".", ""]
    return "\n".join(lines)


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
    claims = ClaimsRun(cfg)
    out = claims.run()
    metrics = {k: plain[k] for k in ("head_fidelity_plain", "head_fidelity_plain_ci95",
                                     "head_minus_tail_fidelity_plain", "head_minus_tail_fidelity_plain_ci95")}
    metrics["tail_fidelity_plain_check"] = plain["tail_fidelity_plain"]
    metrics["tail_fidelity_plain_check_ci95"] = plain["tail_fidelity_plain_ci95"]
    metrics.update(out["metrics"])
    result = out["result"]
    res_dir = cfg.results_dir
    write_json(res_dir / "metrics.json", metrics)
    write_json(res_dir / "claims.json", result)
    write_text(res_dir / "README.md", readme(cfg, metrics, result, plain))
    cc, seed = cfg.claims, cfg.claims.seeds[0]
    for c in cfg.data.tail_classes:
        refs = to_u8([r.image for r in claims.refs[c]])
        rows = [("references", refs)]
        for m in cc.methods:
            images = out["units"][m, c, seed]["images"]
            # evenly spaced over all images: NAO's first indices all lie next to the centroid
            rows.append((LABELS[m], images[torch.linspace(0, len(images) - 1, cc.grid_images).round().long()]))
        save_image(res_dir / "grids" / f"{cfg.class_names[c]}.png", grid(rows))
    return {"metrics": metrics, "seconds": result["seconds"]}
