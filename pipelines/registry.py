"""String registry of generation methods: name (and aliases) -> pipeline class, settings dataclass,
presets and a ``run`` adapter. The CLI and :func:`pipelines.generate.generate_concept` only talk to
this registry, so a new method (e.g. Discriminative Class Tokens) is added by calling
:func:`register_method` in its own file and listing that module in ``PLUGIN_MODULES``.

A ``run`` adapter has the signature ``run(pipe, job, callback)`` where ``job`` is a
:class:`Job` and ``callback({index: Generated})`` is called as soon as images are finished.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

PLUGIN_MODULES: tuple[str, ...] = ("pipelines.dct",)  # modules that call register_method on import


@dataclass
class Generated:
    image: Any                           # PIL image
    tensors: dict[str, torch.Tensor]     # saved as safetensors (at least "seed")
    record: dict = field(default_factory=dict)


@dataclass
class Job:
    prompt: str
    refs: list                           # list[ReferenceImage]
    indices: list[int]
    seed: int
    settings: Any
    cache_dir: Any
    progress: bool = True
    resume: dict = field(default_factory=dict)   # tensors of finished images a method may need (e.g. z*)


@dataclass
class Method:
    name: str
    pipeline_cls: type
    settings_cls: type
    run: Callable[[Any, Job, Callable[[dict[int, Generated]], None]], None]
    presets: dict[str, dict] = field(default_factory=dict)   # preset -> settings overrides
    min_refs: int = 1                    # 0: references optional (only shown on the contact sheet)
    needs_image_encoder: bool = True
    aliases: tuple[str, ...] = ()
    description: str = ""

    def settings(self, preset: str = "reference", device: str = "cpu", **overrides):
        """Settings of ``preset`` with ``overrides``; a preset's dtype ``"auto-bf16"`` means bf16 on CUDA."""
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for {self.name}; expected one of {sorted(self.presets)}")
        values = {**self.presets[preset], **overrides}
        names = {f.name for f in dataclasses.fields(self.settings_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for {self.name}; expected some of {sorted(names)}")
        if values.get("dtype") == "auto-bf16":
            values["dtype"] = "bf16" if str(device).startswith("cuda") else "fp32"
        return self.settings_cls(**values)


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(method: Method) -> Method:
    for key in (method.name, *method.aliases):
        if key.lower() in _ALIASES and _ALIASES[key.lower()] != method.name:
            raise ValueError(f"method name {key!r} is already registered")
        _ALIASES[key.lower()] = method.name
    METHODS[method.name] = method
    return method


def method_names(with_aliases: bool = True) -> list[str]:
    _load_plugins()
    names = list(METHODS)
    if with_aliases:
        names += [a for m in METHODS.values() for a in m.aliases]
    return names


def get_method(name: str) -> Method:
    _load_plugins()
    try:
        return METHODS[_ALIASES[name.lower()]]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {method_names()}") from None


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        importlib.import_module(module)


# ------------------------------------------------------------------------------- built-in methods
def _seed_record(r) -> dict:
    return {"losses": r.history, "best_iteration": r.best_iteration, "best_loss": r.best_loss,
            "stop_reason": r.stop_reason, "seconds": r.seconds, **r.extras}


def _emit(callback, results: dict) -> None:
    callback({i: Generated(r.image, {"seed": r.seed, "initial_seed": r.initial_seed}, _seed_record(r))
              for i, r in results.items()})


def _run_sd(pipe, job: Job, callback) -> None:
    import time

    for start in range(0, len(job.indices), job.settings.batch_size):
        chunk = job.indices[start:start + job.settings.batch_size]
        t0 = time.perf_counter()
        out = pipe(job.prompt, [job.seed + i for i in chunk], job.settings)
        seconds = (time.perf_counter() - t0) / len(chunk)
        callback({i: Generated(im, {"seed": z}, {"seconds": seconds, "seed_int": job.seed + i})
                  for i, im, z in zip(chunk, out.images, out.seeds)})


def _run_seedselect(pipe, job: Job, callback) -> None:
    from .components import encode_references

    enc = encode_references(pipe, job.refs, job.cache_dir)
    z_star = job.resume.get(0, {}).get("seed")
    pipe(job.prompt, enc, job.indices, job.seed, job.settings, z_star=z_star, progress=job.progress,
         callback=lambda res: _emit(callback, res))


def _run_nao(pipe, job: Job, callback) -> None:
    from .components import encode_references

    enc = encode_references(pipe, job.refs, job.cache_dir)
    pipe(job.prompt, job.refs, enc, job.indices, job.seed, job.settings, cache_dir=job.cache_dir,
         progress=job.progress, callback=lambda res: _emit(callback, res))


def _register_builtins() -> None:
    from .nao_seedselect import NaoSeedSelectPipeline, NaoSeedSelectSettings
    from .seedselect import SeedSelectPipeline, SeedSelectSettings
    from .stable_diffusion import StableDiffusionSamplingPipeline, StableDiffusionSettings

    register_method(Method(
        "sd", StableDiffusionSamplingPipeline, StableDiffusionSettings, _run_sd, min_refs=0,
        needs_image_encoder=False, aliases=("StableDiffusion",), description="plain text-to-image baseline",
        presets={"reference": {"dtype": "fp32", "batch_size": 1},
                 "fast": {"dtype": "auto-bf16", "batch_size": 8}}))
    register_method(Method(
        "seedselect", SeedSelectPipeline, SeedSelectSettings, _run_seedselect, min_refs=1,
        aliases=("SeedSelect",), description="seed optimisation against reference images",
        presets={"reference": {"dtype": "fp32"},
                 # one full run for z*, then bootstrap-resampled short runs, 4 seeds per batch
                 "fast": {"dtype": "auto-bf16", "batch_size": 4, "bootstrap": True, "bootstrap_iterations": 5}}))
    register_method(Method(
        "nao-seedselect", NaoSeedSelectPipeline, NaoSeedSelectSettings, _run_nao, min_refs=2,
        aliases=("NAO_SeedSelect", "nao_seedselect"), description="short SeedSelect runs from NAO path points",
        presets={"reference": {"dtype": "fp32"},
                 "fast": {"dtype": "auto-bf16", "batch_size": 8, "nao_solver": "default"}}))


_register_builtins()
