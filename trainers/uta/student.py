"""The UTA student: EVA-02's ViT (`featstore/models/eva02.py`) with UTA's head.

UTA-B, as its released code builds it, is an EVA-02 ViT-B/16 (baaivision/EVA's pre-training
model): pre-LayerNorm blocks with separate q/k/v projections and q/v biases, a SwiGLU feed-forward
(hidden 8/3 x width) with sub-LN (a LayerNorm before its output projection, `ffn_ln`; no
LayerNorm before the attention's output projection: EVA-02-B/L's `inner_attn_ln` is the
identity), 2D rotary position embeddings on the patch tokens beside learned absolute ones, no
layer scale, stochastic depth rising linearly to `drop_path`, a final LayerNorm and one linear
head; its image embedding is head(norm(x)[:, 0]), the CLS.  tests/test_uta_student.py checks the
forward against a transcription of EVA-02's modules and the parameter count of UTA-B.

Switches in `arch` (`configs/uta.yaml` explains the chosen values): `sub_ln` (the MLP's LayerNorm),
`rope`, `abs_pos_embed`, `layer_scale` (null: none, EVA-02-B's; a value: layer scale at that
init), `drop_path`, `mlp` ("swiglu" or "gelu").  Initialisation: BEiT's (truncated normal, each
block's output projections scaled by 1/sqrt(2 * layer)); EVA-02-B's xavier-normal variant is not
reproduced.

Inputs: uint8 pixels (B, 3, H, W), normalized with the crop's mean/std (buffers saved with the
weights), or in light mode stored tokens (B, T, D_in) -> LayerNorm -> a 1x1 "patch" projection of
their (D_in, g, g) grid.  Only the kept positions enter the encoder (`encode(e, positions)`);
RoPE rotates each kept token by its own grid position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



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
        from featstore.models.eva02 import EVA02ViT

        self.arch = dict(arch)
        width, grid = int(arch["width"]), int(arch["grid"])
        self.vit = EVA02ViT(
            image_size=grid * int(arch["patch_size"]), patch_size=int(arch["patch_size"]), width=width,
            depth=int(arch["depth"]), heads=int(arch["heads"]), mlp_dim=int(arch["mlp_dim"]),
            in_channels=int(arch["in_channels"]), mlp=arch["mlp"], mlp_sub_ln=bool(arch["sub_ln"]), attn_sub_ln=False,
            rope=bool(arch["rope"]), abs_pos_embed=bool(arch["abs_pos_embed"]), layer_scale=arch["layer_scale"],
            drop_path=float(arch["drop_path"]))
        self.vit.init_weights()
        self.grid = grid
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
        return self.vit.embed(x)

    def encode(self, e: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on the given position embeddings e (B, K, W) only, plus the CLS:
        (head tokens (B, K, teacher token width), CLS embedding (B, teacher pooled width)).
        `positions` (B, K): the grid position of each of e's tokens (None: all N, in order)."""
        h = self.vit.encode(e, positions)
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
