"""The miniature world (issue 5): a Stable-Diffusion-shaped text-to-image model, a "CLIP" image
encoder and an independent evaluator, all trained by this package on digits bundled with declared
dependencies, so that every pipeline runs offline on 2 CPU cores. One module per artifact:
``data`` (long-tailed + balanced splits), ``vae``, ``text`` (tokenizer + text encoder),
``diffusion`` (UNet, saved as a full SD folder), ``encoder`` (CLIP vision), ``evaluator`` (timm),
``metrics``, ``check`` (plain-sampling fidelity per class). Run a stage with
``python -m benchmarks.mini STAGE``."""
