"""String registry of generation methods: name (and aliases) -> pipeline class, settings dataclass
and presets. The CLI and :func:`pipelines.generate.generate_concepts` only talk to this registry and
to the one ``__call__`` shape every pipeline shares (:mod:`pipelines.base`), so a new method (e.g.
Discriminative Class Tokens) is added by calling :func:`register_method` in its own file and listing
that module in ``PLUGIN_MODULES``.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

PLUGIN_MODULES: tuple[str, ...] = ("pipelines.dct",)  # modules that call register_method on import


@dataclass
class Method:
    name: str
    pipeline_cls: type
    settings_cls: type
    presets: dict[str, dict] = field(default_factory=dict)   # preset -> settings overrides
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def min_refs(self) -> int:
        """References a concept needs (0: optional, only shown on the contact sheet): the pipeline's own."""
        return self.pipeline_cls.min_references

    @property
    def needs_image_encoder(self) -> bool:
        return self.pipeline_cls.needs_image_encoder

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
def _register_builtins() -> None:
    from .nao_seedselect import NaoSeedSelectPipeline, NaoSeedSelectSettings
    from .seedselect import SeedSelectPipeline, SeedSelectSettings
    from .stable_diffusion import StableDiffusionSamplingPipeline, StableDiffusionSettings

    register_method(Method(
        "sd", StableDiffusionSamplingPipeline, StableDiffusionSettings,
        aliases=("StableDiffusion",), description="plain text-to-image baseline",
        presets={"reference": {"dtype": "fp32", "batch_size": 1},
                 "fast": {"dtype": "auto-bf16", "batch_size": 8}}))
    register_method(Method(
        "seedselect", SeedSelectPipeline, SeedSelectSettings,
        aliases=("SeedSelect",), description="seed optimisation against reference images",
        presets={"reference": {"dtype": "fp32"},
                 # one full run for z*, then bootstrap-resampled short runs, 4 seeds per batch
                 "fast": {"dtype": "auto-bf16", "batch_size": 4, "bootstrap": True, "bootstrap_iterations": 5}}))
    register_method(Method(
        "nao-seedselect", NaoSeedSelectPipeline, NaoSeedSelectSettings,
        aliases=("NAO_SeedSelect", "nao_seedselect"), description="short SeedSelect runs from NAO path points",
        presets={"reference": {"dtype": "fp32"},
                 "fast": {"dtype": "auto-bf16", "batch_size": 8, "nao_solver": "default"}}))


_register_builtins()
