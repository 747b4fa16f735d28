"""A transcription of EVA-02's ViT maths from baaivision/EVA (EVA-02/asuka: modeling_finetune.py's
Attention, SwiGLU and Block with `subln`, rope.py's VisionRotaryEmbeddingFast; EVA-CLIP's
eva_vit_model.py adds `inner_attn_ln` under subln), written step by step as the reference code
computes it (explicit q @ k^T attention, einsum/repeat rotary tables, concatenation of the CLS
before adding positions), with the reference's parameter names, so a state dict of
`featstore/models/eva02.py:EVA02ViT` loads into it unchanged.  Used by the parity tests only.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half_ref(x):
    # rope.py: rearrange '... (d r) -> ... d r' (r=2), stack (-x2, x1), back to '... (d r)'
    d = x.shape[-1] // 2
    x = x.reshape(*x.shape[:-1], d, 2)
    x1, x2 = x[..., 0], x[..., 1]
    return torch.stack((-x2, x1), dim=-1).reshape(*x.shape[:-2], d * 2)


class RopeRef(nn.Module):
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len, ft_seq_len), freqs_for='lang'."""

    def __init__(self, dim, pt_seq_len, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        if ft_seq_len is None:
            ft_seq_len = pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # repeat '... n -> ... (n r)', r=2
        a = freqs[:, None, :].expand(ft_seq_len, ft_seq_len, freqs.shape[-1])  # broadcat along dim -1
        b = freqs[None, :, :].expand(ft_seq_len, ft_seq_len, freqs.shape[-1])
        freqs = torch.cat((a, b), dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]), persistent=False)
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]), persistent=False)

    def forward(self, t):
        return t * self.freqs_cos + rotate_half_ref(t) * self.freqs_sin


class AttentionRef(nn.Module):
    def __init__(self, dim, num_heads, rope, inner_ln):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=1e-6) if inner_ln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x):
        B, N, C = x.shape
        q = nn.functional.linear(x, self.q_proj.weight, self.q_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        k = nn.functional.linear(x, self.k_proj.weight, None).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        v = nn.functional.linear(x, self.v_proj.weight, self.v_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.rope is not None:
            q = torch.cat((q[:, :, :1, :], self.rope(q[:, :, 1:, :])), -2).type_as(v)
            k = torch.cat((k[:, :, :1, :], self.rope(k[:, :, 1:, :])), -2).type_as(v)
        q = q * self.scale
        attn = (q.float() @ k.float().transpose(-2, -1)).softmax(dim=-1).type_as(x)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = self.inner_attn_ln(x)
        return self.proj(x)


class SwiGLURef(nn.Module):
    def __init__(self, dim, hidden, subln):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6) if subln else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        hidden = self.act(self.w1(x)) * self.w2(x)
        return self.w3(self.ffn_ln(hidden))


class BlockRef(nn.Module):
    def __init__(self, dim, num_heads, hidden, rope, subln, inner_ln):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = AttentionRef(dim, num_heads, rope, inner_ln)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLURef(dim, hidden, subln)

    def forward(self, x):  # gamma_1 is None, drop_path identity (eval)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVA02Ref(nn.Module):
    """forward_features without masking: patches, cat CLS, + pos_embed, blocks, norm."""

    def __init__(self, img_size, patch_size, dim, depth, num_heads, hidden, subln=True, inner_ln=False, pt_seq_len=None):
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        rope = RopeRef(dim // num_heads // 2, pt_seq_len or grid, ft_seq_len=grid)
        self.blocks = nn.ModuleList(BlockRef(dim, num_heads, hidden, rope, subln, inner_ln) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
