"""Prompt text: class names into prompts, prompts into the text encoder's hidden states."""
from __future__ import annotations

from typing import Sequence

import torch


def format_prompt(name: str, template: str = "{}") -> str:
    """Class name -> prompt: underscores become spaces, then the template is filled."""
    return template.format(name.replace("_", " ").strip())


@torch.no_grad()
def encode_prompts(comps, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden state of the text encoder for each prompt, (P, L, D) in the model dtype."""
    tok = comps.tokenizer(list(prompts), padding="max_length", max_length=comps.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    return comps.text_encoder(tok.input_ids.to(comps.device))[0]
