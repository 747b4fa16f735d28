"""The UTA student: an EVA-02-like ViT assembled from transformers' DINOv3 ViT layers.

UTA-B, as its released code builds it, is an EVA-02 ViT-B/16: pre-LayerNorm blocks with a SwiGLU
feed-forward (hidden 8/3 x width) and sub-LN (a LayerNorm before the output projection of the
attention and of the feed-forward), 2D rotary position embeddings on the patch tokens beside
learned absolute ones, q/v biases, no layer scale, stochastic depth, a final LayerNorm and one
linear head; its image embedding is head(norm(x)[:, 0]), the CLS.

transformers has no EVA-02, but its DINOv3 ViT layer (`DINOv3ViTLayer`) has the parts: a gated
(SwiGLU with `silu`) or plain MLP, layer scale, drop path and 2D axial RoPE applied to the patch
tokens only (the CLS is not rotated, as in EVA-02), q/v bias without k bias.  What this module adds,
each a switch in `arch` (`configs/uta.yaml` explains the chosen values):

* `sub_ln`: a LayerNorm in front of each layer's attention output projection and MLP down
  projection (EVA-02's sub-LN);
* `rope`: EVA-02's frequencies.  DINOv3 rotates by 2*pi*c*f with c in [-1, 1] the patch centre;
  EVA-02 by t*g with t = 16 * p / grid and g = 10000^(-4i/head_dim).  Both have head_dim/4
  frequencies per axis; with f = (4/pi)*g they differ by a phase that is the same for every
  position, which cancels in q.k, and by a fixed permutation of the head's channels, which the
  learned q/k projections absorb: the attention logits have the same form as EVA-02's;
* `abs_pos_embed`: learned absolute position embeddings (EVA-02 keeps them beside RoPE);
* `layer_scale`: null removes DINOv3's layer scale (EVA-02-B has none), a value keeps it at that init;
* `drop_path`: stochastic depth rising linearly from 0 at the first block to this value at the
  last (EVA-02's rule; DINOv3's layers take one rate for all);
* `mlp`: "swiglu" or "gelu".

Inputs: uint8 pixels (B, 3, H, W), normalized with the crop's mean/std (buffers saved with the
weights), or in light mode stored tokens (B, T, D_in) -> LayerNorm -> a 1x1 "patch" projection of
their (D_in, g, g) grid.  Only the kept positions enter the encoder (`encode(e, positions)`);
RoPE rotates each kept token by its own grid position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # EVA-02's LayerNorm epsilon
EVA_ROPE_THETA = 10000.0


class UTAStudent(torch.nn.Module):
    @classmethod
    def from_state(cls, state: dict, weights: dict | None = None) -> "UTAStudent":
        """The student a checkpoint's state describes (its `arch`), with `weights` loaded when given."""
        model = cls(state["arch"])
        if weights is not None:
            model.load_state_dict(weights)
        return model

    def __init__(self, arch: dict):
        super().__init__()
        from transformers import DINOv3ViTConfig, DINOv3ViTModel
        from transformers.models.dinov3_vit.modeling_dinov3_vit import Dinov3ViTDropPath

        self.arch = dict(arch)
        width, depth, grid = int(arch["width"]), int(arch["depth"]), int(arch["grid"])
        swiglu = arch["mlp"] == "swiglu"
        config = DINOv3ViTConfig(
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=int(arch["heads"]),
            intermediate_size=int(arch["mlp_dim"]), hidden_act="silu" if swiglu else "gelu", use_gated_mlp=swiglu,
            layerscale_value=float(arch["layer_scale"] or 1.0), drop_path_rate=0.0, layer_norm_eps=LN_EPS,
            rope_theta=EVA_ROPE_THETA, image_size=grid * int(arch["patch_size"]), patch_size=int(arch["patch_size"]),
            num_channels=int(arch["in_channels"]), num_register_tokens=0, query_bias=True, key_bias=False,
            value_bias=True, pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None,
        )
        vit = DINOv3ViTModel(config)
        vit.embeddings.mask_token.requires_grad_(False)  # UTA uses no [MASK] token
        for i, layer in enumerate(vit.model.layer):
            rate = float(arch["drop_path"]) * i / max(1, depth - 1)
            layer.drop_path = Dinov3ViTDropPath(rate) if rate > 0 else torch.nn.Identity()
            if arch["layer_scale"] is None:
                layer.layer_scale1, layer.layer_scale2 = torch.nn.Identity(), torch.nn.Identity()
            if arch["sub_ln"]:
                layer.attention.o_proj = torch.nn.Sequential(torch.nn.LayerNorm(width, eps=LN_EPS), layer.attention.o_proj)
                layer.mlp.down_proj = torch.nn.Sequential(torch.nn.LayerNorm(int(arch["mlp_dim"]), eps=LN_EPS),
                                                          layer.mlp.down_proj)
            with torch.no_grad():  # BEiT/EVA: scale each block's output projections by 1/sqrt(2 * layer)
                for proj in (layer.attention.o_proj, layer.mlp.down_proj):
                    (proj[-1] if isinstance(proj, torch.nn.Sequential) else proj).weight.div_(math.sqrt(2.0 * (i + 1)))
        if arch["rope"]:
            rope = vit.rope_embeddings
            rope.inv_freq = rope.inv_freq * (4.0 / math.pi)  # EVA-02's spectrum (see the module docstring)
        self.vit = vit
        self.grid = grid
        self.pos_embed = None
        if arch["abs_pos_embed"]:
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid + 1, width))
            torch.nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.head = torch.nn.Linear(width, int(arch["out_dim"]))
        # one head for tokens and CLS (UTA's), or a second one for the CLS (another width or space)
        self.cls_head = None if arch["cls_head"] == "shared" else torch.nn.Linear(width, int(arch["cls_dim"]))
        for head in (self.head, self.cls_head):
            if head is not None:
                torch.nn.init.trunc_normal_(head.weight, std=0.02)
                torch.nn.init.zeros_(head.bias)
        self.tokens_in = arch["input"] == "tokens"
        if self.tokens_in:
            self.input_norm = torch.nn.LayerNorm(int(arch["in_channels"]))
        else:
            self.register_buffer("pixel_mean", torch.tensor(arch["mean"], dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("pixel_std", torch.tensor(arch["std"], dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Every grid position's input embedding (B, N, W): patch projection (+ absolute position)."""
        if self.tokens_in:
            x = self.input_norm(x.float())
            b, n, d = x.shape
            x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        else:
            x = (x.float() / 255.0 - self.pixel_mean) / self.pixel_std
        e = self.vit.embeddings.patch_embeddings(x).flatten(2).transpose(1, 2)
        return e + self.pos_embed[:, 1:] if self.pos_embed is not None else e

    def _rotations(self, positions: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for each kept token: (B or 1, 1, K, head_dim); the identity without rope."""
        head_dim = self.arch["width"] // self.arch["heads"]
        if not self.arch["rope"]:
            ones = torch.ones(1, 1, n, head_dim, device=device)
            return ones, torch.zeros_like(ones)
        side = self.grid * self.arch["patch_size"]
        cos, sin = self.vit.rope_embeddings(torch.empty(1, 1, side, side, device=device))  # (N, head_dim) each
        if positions is None:
            return cos[None, None], sin[None, None]
        positions = positions.to(device)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def encode(self, e: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on the given position embeddings e (B, K, W) only, plus the CLS:
        (head tokens (B, K, teacher token width), CLS embedding (B, teacher pooled width)).
        `positions` (B, K): the grid position of each of e's tokens (None: all N, in order)."""
        cls = self.vit.embeddings.cls_token.expand(len(e), -1, -1)
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, :1]
        h = torch.cat([cls, e], dim=1)
        rotations = self._rotations(positions, e.shape[1], e.device)
        for layer in self.vit.model.layer:
            h = layer(h, position_embeddings=rotations)
        h = self.vit.norm(h)
        return self.head(h[:, 1:]), (self.cls_head or self.head)(h[:, 0])

    def features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(head tokens, CLS embedding) of the kept positions `keep` (m*B, K) (rows i, i+B, ... are
        image i under m masks), or of every position when `keep` is None."""
        e = self.embed(x)
        if keep is None:
            return self.encode(e)
        e = gather_tokens(e.repeat(len(keep) // len(e), 1, 1), keep)
        return self.encode(e, keep)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Head tokens at the kept positions (or every position)."""
        return self.features(x, keep)[0]

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding: head(norm(x)[:, 0]) on the whole image, as UTA's released model."""
        return self.features(x)[1]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
