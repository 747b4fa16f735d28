"""EVA-02's ViT (Fang et al., 2023), as baaivision/EVA builds it, in plain torch.

One module for the two places the project runs this architecture: the UTA student
(`trainers/uta/student.py`, EVA-02 ViT-B/16 as UTA trains it) and EVA-CLIP's vision tower.  The
parameter names are EVA's own (``patch_embed.proj``, ``blocks.{i}.attn.q_proj``, ``q_bias``,
``v_bias``, ``inner_attn_ln``, ``mlp.w1/w2/ffn_ln/w3``, ``norm``), so an EVA state dict loads as it is.

A block is pre-LayerNorm: ``x + drop_path(gamma_1 * attn(norm1(x)))``, then the same with the MLP.

* attention: separate q, k, v projections without bias, plus learned q and v biases (k has none);
  2D rotary embeddings on the patch tokens (the CLS is not rotated); ``inner_attn_ln``, a
  LayerNorm before the output projection, only where EVA has one (EVA-CLIP's towers with
  ``subln``; EVA-02-B/L's pre-training blocks have none: ``attn_sub_ln=False``);
* MLP: SwiGLU ``w3(ffn_ln(silu(w1 x) * w2 x))`` with ``ffn_ln`` a LayerNorm under sub-LN (EVA-02-B/L)
  or a GELU MLP ``fc2(ffn_ln(gelu(fc1 x)))``;
* rotary embeddings (EVA's ``VisionRotaryEmbeddingFast``): half of each head's channels rotate
  with the row, half with the column, each at head_dim/4 frequencies ``theta^(-4i/head_dim)``,
  channel pairs interleaved; positions ``t = arange(grid) / grid * pt_grid`` (``pt_grid`` the grid
  the model was pre-trained at; EVA-CLIP-B/16 uses 16 at a 14x14 grid);
* optional layer scale (``gamma_1``, ``gamma_2``), stochastic depth, absolute position embeddings.

Attention runs through torch's scaled_dot_product_attention (EVA uses xformers' memory-efficient
kernel: the same maths).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # EVA's LayerNorm epsilon


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): EVA's interleaved channel pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RotaryGrid(nn.Module):
    """2D rotary embeddings of a square grid of side `grid`: buffers cos, sin (grid*grid, head_dim),
    position p = row * grid + column."""

    def __init__(self, head_dim: int, grid: int, pt_grid: int | None = None, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
        dim = head_dim // 2  # per axis
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        t = torch.arange(grid).float() / grid * (pt_grid or grid)
        f = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # (grid, dim), each frequency twice
        rows = f[:, None, :].expand(grid, grid, dim)
        cols = f[None, :, :].expand(grid, grid, dim)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, t: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate t (B, heads, K, head_dim); `positions` (B, K) the grid position of each token
        (None: all grid*grid positions in order)."""
        cos, sin = (self.cos, self.sin) if positions is None else (self.cos[positions][:, None], self.sin[positions][:, None])
        return t * cos + rotate_half(t) * sin


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `p` in training."""

    def __init__(self, p: float):
        super().__init__()
        self.drop_prob = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def norm_or_identity(on: bool, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=LN_EPS) if on else nn.Identity()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, qv_bias: bool = True, sub_ln: bool = False):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.inner_attn_ln = norm_or_identity(sub_ln, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryGrid | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        q = split(F.linear(x, self.q_proj.weight, self.q_bias))
        k = split(F.linear(x, self.k_proj.weight, None))
        v = split(F.linear(x, self.v_proj.weight, self.v_bias))
        if rope is not None:  # the patch tokens only: token 0 is the CLS
            q = torch.cat([q[:, :, :1], rope(q[:, :, 1:], positions)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :1], rope(k[:, :, 1:], positions)], dim=2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, *, sub_ln: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = norm_or_identity(sub_ln, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))

    @property
    def out_proj(self) -> nn.Linear:
        return self.w3


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, *, sub_ln: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_ln = norm_or_identity(sub_ln, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_ln(F.gelu(self.fc1(x))))

    @property
    def out_proj(self) -> nn.Linear:
        return self.fc2


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, *, mlp: str = "swiglu", mlp_sub_ln: bool = True,
                 attn_sub_ln: bool = False, qv_bias: bool = True, layer_scale: float | None = None, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qv_bias=qv_bias, sub_ln=attn_sub_ln)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = (SwiGLU if mlp == "swiglu" else GeluMLP)(dim, mlp_dim, sub_ln=mlp_sub_ln)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RotaryGrid | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), rope, positions)
        x = x + self.drop_path(a * self.gamma_1 if self.gamma_1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m * self.gamma_2 if self.gamma_2 is not None else m)


class EVA02ViT(nn.Module):
    """Patch embedding, CLS, absolute positions, `depth` blocks, final norm (no head: its users add one).

    `embed(x)` gives every grid position's input embedding; `encode(e, positions)` runs the blocks on
    the CLS plus the given tokens only (UTA's unmasked tokens, each rotated by its own position)."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int,
                 in_channels: int = 3, mlp: str = "swiglu", mlp_sub_ln: bool = True, attn_sub_ln: bool = False,
                 qv_bias: bool = True, rope: bool = True, pt_grid: int | None = None, abs_pos_embed: bool = True,
                 layer_scale: float | None = None, drop_path: float = 0.0):
        super().__init__()
        self.grid = image_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, width)) if abs_pos_embed else None
        self.rope = RotaryGrid(width // heads, self.grid, pt_grid) if rope else None
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # EVA: linspace(0, drop_path, depth)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, mlp=mlp, mlp_sub_ln=mlp_sub_ln, attn_sub_ln=attn_sub_ln,
                                          qv_bias=qv_bias, layer_scale=layer_scale, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(width, eps=LN_EPS)

    def init_weights(self, std: float = 0.02) -> None:
        """BEiT's initialisation, as EVA's: truncated-normal linear/conv weights, zero biases, unit
        LayerNorms, and each block's output projections scaled by 1/sqrt(2 * layer)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                for proj in (block.attn.proj, block.mlp.out_proj):
                    proj.weight.div_(math.sqrt(2.0 * (i + 1)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Every grid position's input embedding (B, N, W): patches (+ absolute positions)."""
        e = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return e + self.pos_embed[:, 1:] if self.pos_embed is not None else e

    def encode(self, e: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, 1 + K, W) of the CLS and the tokens e (B, K, W), whose
        grid positions are `positions` (B, K) (None: all N in order)."""
        cls = self.cls_token.expand(len(e), -1, -1)
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, :1]
        h = torch.cat([cls, e], dim=1)
        if positions is not None:
            positions = positions.to(e.device)
        for block in self.blocks:
            h = block(h, self.rope, positions)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(x))
