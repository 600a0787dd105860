"""Generation methods for rare concepts: plain Stable Diffusion, SeedSelect, NAO, NAO-SeedSelect,
Discriminative Class Tokens. Seed-space maths (norm priors, interpolation, centroids) lives in
:mod:`pipelines.seed_space`."""


def __getattr__(name: str):
    # ``from pipelines import generate_concept`` without importing torch/diffusers on ``import pipelines``
    if name == "generate_concept":
        from .generate import generate_concept

        return generate_concept
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
