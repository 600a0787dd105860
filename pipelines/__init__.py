"""Generation methods for rare concepts: plain Stable Diffusion, SeedSelect, NAO, NAO-SeedSelect,
Discriminative Class Tokens. Seed-space maths (norm priors, interpolation, centroids) lives in
:mod:`pipelines.seed_space`."""
