"""A transcription of EVA-CLIP's maths from baaivision/EVA (EVA-CLIP/rei/eva_clip): the vision tower
`EVAVisionTransformer` with ``use_mean_pooling=False`` (model.py passes ``global_average_pool``,
False in every EVA02-CLIP config): ``forward_features`` = blocks, ``norm``, ``x[:, 0]``; then
``head = Linear(width, embed_dim)`` (``num_classes=embed_dim``); and transformer.py's
`TextTransformer` as `CLIP.encode_text` runs it: token + positional embeddings, LND layout,
`ResidualAttentionBlock`s (``ln_1``, attention with packed ``in_proj_weight``/``in_proj_bias`` and
``out_proj``, an additive ``-inf`` causal mask ``triu(1)``, ``ln_2``, ``mlp.c_fc`` -> GELU ->
``mlp.c_proj``), ``ln_final``, the EOT token's state (``text.argmax(-1)``: the EOT id is the largest
in CLIP's vocabulary) ``@ text_projection``.  Attention is written as the reference's non-xformers
path (bmm of q * scale and k^T, softmax, bmm with v).  Parameter names are the reference's, so
``state_dict()`` of these modules gives EVA's checkpoint keys (under ``visual.`` and ``text.``).
Used by tests/test_eva_clip.py only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from eva02_reference import EVA02Ref


class EvaClipVisualRef(EVA02Ref):
    """EVAVisionTransformer(num_classes=embed_dim, use_mean_pooling=False, subln=True, naiveswiglu=True,
    rope=True, intp_freq=True): EVA02Ref (blocks with inner_attn_ln, final norm) plus `head`."""

    def __init__(self, img_size, patch_size, dim, depth, num_heads, hidden, embed_dim, pt_seq_len=16):
        super().__init__(img_size, patch_size, dim, depth, num_heads, hidden, subln=True, inner_ln=True,
                         pt_seq_len=pt_seq_len)
        self.head = nn.Linear(dim, embed_dim)

    def features(self, x):
        """forward_features(return_all_features=True) then self.norm: (B, 1 + N, dim)."""
        return EVA02Ref.forward(self, x)

    def forward(self, x):
        return self.head(self.features(x)[:, 0])

    def rope_buffers(self):
        """The rotary tables EVA's VisionRotaryEmbeddingFast registers as (persistent) buffers,
        under every name EVA's state dict lists them: the tower's `rope` and each block's attn.rope."""
        rope = self.blocks[0].attn.rope
        out = {"rope.freqs_cos": rope.freqs_cos, "rope.freqs_sin": rope.freqs_sin}
        for i in range(len(self.blocks)):
            out[f"blocks.{i}.attn.rope.freqs_cos"] = rope.freqs_cos
            out[f"blocks.{i}.attn.rope.freqs_sin"] = rope.freqs_sin
        return out


class TextAttentionRef(nn.Module):
    """transformer.py `Attention` (xattn=False, scaled_cosine=False, scale_heads=False), (L, N, C) input."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.in_proj_weight = nn.Parameter(torch.randn(dim * 3, dim) * self.scale)
        self.in_proj_bias = nn.Parameter(torch.zeros(dim * 3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        L, N, C = x.shape
        q, k, v = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q.contiguous().view(L, N * self.num_heads, -1).transpose(0, 1)
        k = k.contiguous().view(L, N * self.num_heads, -1).transpose(0, 1)
        v = v.contiguous().view(L, N * self.num_heads, -1).transpose(0, 1)
        q = q * self.scale
        attn = torch.bmm(q, k.transpose(-1, -2))
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = attn.softmax(dim=-1)
        x = torch.bmm(attn, v)
        x = x.transpose(0, 1).reshape(L, N, C)
        return self.out_proj(x)


class ResidualAttentionBlockRef(nn.Module):
    def __init__(self, d_model, n_head, mlp_ratio=4.0, act_layer=nn.GELU):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)  # EVA's LayerNorm / FusedLayerNorm: eps 1e-5
        self.attn = TextAttentionRef(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, width)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(width, d_model))]))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class TextTransformerRef(nn.Module):
    def __init__(self, context_length, vocab_size, width, heads, layers, output_dim):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width).normal_(std=0.01))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlockRef(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim).normal_(std=width ** -0.5))
        mask = torch.empty(context_length, context_length)
        mask.fill_(float("-inf"))
        mask.triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, text):
        x = self.token_embedding(text)
        x = x + self.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        for r in self.transformer.resblocks:
            x = r(x, attn_mask=self.attn_mask)
        x = x.permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def tokenize_ref(tokenizer, texts, context_length):
    """open_clip's / EVA's `tokenize`: [sot] + BPE + [eot], cut to context_length (eot kept last),
    zero-padded to context_length; the BPE ids here come from the CLIP tokenizer under test."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]  # bos ... eos
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tokenizer.eos_token_id
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def timm_name(k: str) -> str:
    """An EVA vision key (without `visual.`) as timm's Eva names it: timm/models/eva.py
    checkpoint_filter_fn's renames, for EVA-CLIP's separate q/k/v projections (`no_qkv`)."""
    k = k.replace("mlp.ffn_ln", "mlp.norm")
    k = k.replace("attn.inner_attn_ln", "attn.norm")
    k = k.replace("mlp.w12", "mlp.fc1")
    k = k.replace("mlp.w1", "mlp.fc1_g")
    k = k.replace("mlp.w2", "mlp.fc1_x")
    k = k.replace("mlp.w3", "mlp.fc2")
    k = k.replace("q_bias", "q_proj.bias")
    k = k.replace("v_bias", "v_proj.bias")
    return k


# ---- saving a tiny random EVA-CLIP in both real checkpoint layouts (for the tests) ----------------------
def clip_tokenizer(path):
    """A CLIP BPE tokenizer (transformers' CLIPTokenizer, saved to `path`) with a tiny vocabulary: the
    256 byte symbols, each also with `</w>`, a few merges, then <|startoftext|> and <|endoftext|> (the
    largest id, as in CLIP's vocabulary): 521 tokens."""
    import json

    import transformers as tf

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    merges = ["p h", "ph o", "t o</w>", "c a", "ca t</w>", "d o", "do g</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = tf.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(str(path))
    assert tok.eos_token_id == len(tok) - 1
    return tok


def randomize(module, seed):
    """Every parameter random (LayerNorm weights around 1), so no zero bias hides a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = any(s in name for s in ("norm", "ln")) and p.ndim == 1
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


OPENAI_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                     "interpolation": "bicubic", "resize_mode": "shortest"}


def save_tiny_eva_clip(root, config: dict, seed: int = 0) -> dict:
    """The random EVA-CLIP `config` (EVA-CLIP's model-config format: vision_cfg.eva_model_name with its
    sizes, naiveswiglu + subln + rope + intp_freq) saved twice under `root`: ``open_clip/`` (open_clip's hub
    layout: open_clip_config.json with preprocess_cfg, open_clip_model.safetensors with timm's
    ``visual.trunk.*`` names and ``text.*``) and ``eva/`` (the bare config, a .pt state dict with EVA's
    ``visual.*`` names, its rotary buffers, ``text.*``); both with a CLIP tokenizer.  Returns {"dirs":
    {layout: path}, "visual", "text" (the reference modules), "eva_sd", "open_clip_sd"}."""
    import json
    import math
    from pathlib import Path

    from safetensors.torch import save_file

    root = Path(root)
    v, t = config["vision_cfg"], config["text_cfg"]
    vis = EvaClipVisualRef(v["image_size"], v["patch_size"], v["width"], v["layers"], v["width"] // v["head_width"],
                           int(v["width"] * v["mlp_ratio"]), config["embed_dim"], pt_seq_len=v["pt_hw_seq_len"]).eval()
    txt = TextTransformerRef(t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"],
                             config["embed_dim"]).eval()
    randomize(vis, seed)
    randomize(txt, seed + 1)
    text_sd = {"text." + k: x for k, x in txt.state_dict().items()}
    logit = {"logit_scale": torch.tensor(math.log(1 / 0.07))}
    eva = {**{"visual." + k: x for k, x in vis.state_dict().items()},
           **{"visual." + k: x for k, x in vis.rope_buffers().items()}, **text_sd, **logit}
    open_clip = {**{"visual.trunk." + timm_name(k): x for k, x in vis.state_dict().items()}, **text_sd, **logit}
    dirs = {}
    for kind, sd in (("open_clip", open_clip), ("eva", eva)):
        d = root / kind
        d.mkdir(parents=True)
        tok = clip_tokenizer(d)
        assert len(tok) <= t["vocab_size"]
        sd = {k: x.detach().clone().contiguous() for k, x in sd.items()}
        if kind == "eva":
            (d / "open_clip_config.json").write_text(json.dumps(config))
            torch.save(sd, d / "EVA02_CLIP_tiny_psz8.pt")
        else:
            (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": OPENAI_PREPROCESS}))
            save_file(sd, str(d / "open_clip_model.safetensors"))
        dirs[kind] = d
    return {"dirs": dirs, "visual": vis, "text": txt, "eva_sd": eva, "open_clip_sd": open_clip}
