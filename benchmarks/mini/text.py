"""The mini world's text side: the real CLIP BPE tokenizer (built offline from open_clip's
vocabulary) and a small ``CLIPTextModel``. The text encoder stays at its seeded random init and is
frozen, as SD freezes CLIP: distinct class words give distinct token embeddings and (through causal
attention) distinct hidden states at every position after the word, which the UNet learns to read."""
from __future__ import annotations

from dataclasses import asdict

import torch

from pipelines.io import atomic_dir, write_json

from .config import MiniConfig
from .tokenizer import build_clip_tokenizer


def build_text_encoder(cfg: MiniConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = cfg.text
    tok = build_clip_tokenizer(tc.max_length)
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        max_position_embeddings=tc.max_length, projection_dim=tc.hidden_size,
        initializer_factor=tc.initializer_factor, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(tc.seed)
    return tok, CLIPTextModel(config).eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Exactly what ``StableDiffusionPipeline.encode_prompt`` computes (padding to max length)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def build(cfg: MiniConfig) -> dict:
    tok, enc = build_text_encoder(cfg)
    emb = encode_prompts(tok, enc, [cfg.prompt(c) for c in range(len(cfg.class_names))])
    flat = torch.nn.functional.normalize(emb.flatten(1), dim=1)
    cos = flat @ flat.T
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    report = {"config": asdict(cfg.text), "prompt_template": cfg.data.prompt_template,
              "max_cosine_between_class_prompts": off.max().item()}
    if off.max() > 0.9999:
        raise ValueError(f"class prompts are not distinct after the text encoder (cosine {off.max():.6f})")
    with atomic_dir(cfg.text_dir) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        enc.save_pretrained(tmp / "text_encoder")
        write_json(tmp / "text.json", report)
    return report
