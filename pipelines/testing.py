"""Tiny, randomly initialised components for tests and offline benchmarks.

Everything is built from configs (no network), seeded and deterministic: the same call gives the
same weights. The tokenizer is the REAL CLIP BPE tokenizer, rebuilt offline from the vocabulary
that ships inside open_clip, so prompts tokenize exactly as with Stable Diffusion.

``save_tiny_pipeline(folder)`` / ``save_tiny_image_encoder(folder)`` write folders that
:func:`pipelines.loading.load_components` (and hence the CLI) loads like a hub model.
"""
from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# 32x32 images, 4x8x8 latents: the "miniature SD" geometry of the project's offline world.
TINY_LATENT_SIZE = 8
TINY_TEXT_DIM = 32
TINY_CLIP_SIZE = 32


@dataclass(frozen=True)
class TinySizes:
    """Knobs of the tiny models; the benchmark widens them so activations dominate memory."""
    latent_size: int = TINY_LATENT_SIZE
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (8, 16, 16)  # 3 blocks -> vae_scale_factor 4: 32x32 images
    text_dim: int = TINY_TEXT_DIM
    clip_size: int = TINY_CLIP_SIZE
    clip_dim: int = 32
    projection_dim: int = 16


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP vocab + merges, derived from open_clip's bundled BPE file (same ids as OpenAI CLIP)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                         model_max_length=77)


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_unet(sizes: TinySizes = TinySizes(), seed: int = 0):
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    n = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=sizes.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=sizes.text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_vae(sizes: TinySizes = TinySizes(), seed: int = 1):
    from diffusers import AutoencoderKL

    _seeded(seed)
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sizes.latent_size * 2 ** (n - 1),
        scaling_factor=0.18215,
    ).eval()


def tiny_text_encoder(sizes: TinySizes = TinySizes(), seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.text_dim, intermediate_size=2 * sizes.text_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def tiny_scheduler():
    from diffusers import DDIMScheduler

    from .loading import REFERENCE_SCHEDULER_CONFIG

    return DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)


def tiny_image_encoder(sizes: TinySizes = TinySizes(), seed: int = 3):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) at ``sizes.clip_size`` pixels."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed)
    config = CLIPVisionConfig(
        hidden_size=sizes.clip_dim, intermediate_size=2 * sizes.clip_dim, num_hidden_layers=2,
        num_attention_heads=2, image_size=sizes.clip_size, patch_size=8,
        projection_dim=sizes.projection_dim,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.clip_size}, crop_size={"height": sizes.clip_size, "width": sizes.clip_size},
    )
    return model, processor


def tiny_components(sizes: TinySizes = TinySizes(), dtype: torch.dtype = torch.float32):
    """All components as a :class:`pipelines.loading.Components` (model ids name them as tiny)."""
    from .loading import Components

    image_encoder, processor = tiny_image_encoder(sizes)
    comps = Components(
        vae=tiny_vae(sizes), text_encoder=tiny_text_encoder(sizes), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(sizes), scheduler=tiny_scheduler(), image_encoder=image_encoder,
        image_processor=processor, model_id=f"tiny-sd:{sizes}", image_encoder_id=f"tiny-clip:{sizes}",
    )
    return comps.to(dtype=dtype)


def save_tiny_pipeline(folder: str | os.PathLike, sizes: TinySizes = TinySizes()) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder of the tiny models."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(sizes), text_encoder=tiny_text_encoder(sizes), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(sizes), scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def save_tiny_image_encoder(folder: str | os.PathLike, sizes: TinySizes = TinySizes()) -> Path:
    """Write a transformers folder (model + image processor) of the tiny CLIP image encoder."""
    model, processor = tiny_image_encoder(sizes)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_clip(folder: str | os.PathLike, sizes: TinySizes = TinySizes(), seed: int = 4) -> Path:
    """Write a transformers folder of a tiny full ``CLIPModel`` (text and vision towers, the real
    CLIP tokenizer, an image processor): loadable as SeedSelect's image encoder
    (``CLIPVisionModelWithProjection``) and as a zero-shot classifier, like the LAION ViT-H/14 repo."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    _seeded(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=sizes.clip_dim, intermediate_size=2 * sizes.clip_dim,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         projection_dim=sizes.projection_dim),
        vision_config=dict(hidden_size=sizes.clip_dim, intermediate_size=2 * sizes.clip_dim, num_hidden_layers=2,
                           num_attention_heads=2, image_size=sizes.clip_size, patch_size=8,
                           projection_dim=sizes.projection_dim),
        projection_dim=sizes.projection_dim)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.clip_size}, crop_size={"height": sizes.clip_size, "width": sizes.clip_size})
    CLIPProcessor(image_processor=processor, tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return Path(folder)
