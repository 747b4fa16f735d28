"""The UTA student and its masks, without a store: what only the kept positions see, the CLS
alignment, the EVA-02-like options (SwiGLU + sub-LN, RoPE with EVA-02's frequencies, layer scale,
drop path), block-wise masking, grids and flips."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featstore.errors import ConfigError
from featstore.trainers.config import load_config
from featstore.trainers.uta.arch import resolve_arch
from featstore.trainers.uta.batch import flip_tokens, interpolate_grid, prepare_batch
from featstore.trainers.uta.config import UTAConfig
from featstore.trainers.uta.loss import alignment_loss, alignment_losses
from featstore.trainers.uta.masks import draw_masks, mask_groups, step_generator
from featstore.trainers.uta.student import gather_tokens, UTAStudent
from featstore.trainers.uta.masks import block_mask
from featstore.trainers.loop import count_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _arch(grid=4, patch=4, out_dim=8, pooled_dim=None, **over):
    cfg = load_config(None, [f"{k}={v}" for k, v in {"width": 16, "depth": 2, "heads": 1, "patch_size": patch, **over}.items()],
                      base=UTAConfig())
    return resolve_arch(cfg, teacher_tokens=(grid * grid, out_dim), pixels_shape=(3, grid * patch, grid * patch),
                        pixels_identity={"mean": [0.5] * 3, "std": [0.25] * 3}, teacher_pooled_dim=pooled_dim)


def _student(**over):
    torch.manual_seed(0)
    return UTAStudent(_arch(**over)).eval()


# ---- masks ---------------------------------------------------------------------------------------
def test_random_masks_exact():
    keep, comp = draw_masks(6, 16, 0.5, step_generator(0, 7))
    assert keep.shape == comp.shape == (6, 8)
    for k, c in zip(keep, comp):  # sorted, disjoint, together every position exactly once
        assert torch.equal(k, k.sort().values) and torch.equal(c, c.sort().values)
        assert torch.equal(torch.cat([k, c]).sort().values, torch.arange(16))
    assert len({tuple(k.tolist()) for k in keep}) == 6  # every sample its own mask
    assert torch.equal(draw_masks(6, 16, 0.5, step_generator(0, 7))[0], keep)  # a pure function of (seed, step)
    assert not torch.equal(draw_masks(6, 16, 0.5, step_generator(0, 8))[0], keep)  # another step, other masks
    assert not torch.equal(draw_masks(6, 16, 0.5, step_generator(1, 7))[0], keep)  # another seed
    k75, c75 = draw_masks(3, 16, 0.75, step_generator(0, 0))
    assert k75.shape == (3, 4) and c75.shape == (3, 12) and len(mask_groups([k75, c75])) == 2
    assert [m.shape for m in mask_groups([keep, comp])] == [(12, 8)]  # equal halves: one forward of 2B
    (only,) = draw_masks(3, 16, 0.5, step_generator(0, 0), reversed_masking=False)  # no complement view
    assert only.shape == (3, 8)
    (full,) = draw_masks(2, 9, 0.0, step_generator(0, 0))
    assert torch.equal(full, torch.arange(9).expand(2, 9))  # ratio 0: every position, no complement


def _neighbour_pairs(dropped: np.ndarray, side: int) -> int:
    """How many horizontally/vertically adjacent pairs of positions are both dropped."""
    g = dropped.reshape(side, side)
    return int((g[:, 1:] & g[:, :-1]).sum() + (g[1:] & g[:-1]).sum())


def test_block_masks_exact_count_blocky_and_deterministic():
    side, n = 14, 196
    keep, comp = draw_masks(32, n, 0.5, step_generator(0, 3), masking="block")
    assert keep.shape == comp.shape == (32, 98)
    for k, c in zip(keep, comp):
        assert torch.equal(torch.cat([k, c]).sort().values, torch.arange(n))
    again = draw_masks(32, n, 0.5, step_generator(0, 3), masking="block")
    assert torch.equal(again[0], keep) and torch.equal(again[1], comp)
    assert not torch.equal(draw_masks(32, n, 0.5, step_generator(0, 4), masking="block")[0], keep)
    # blocks: far more dropped neighbours than a uniform subset of the same size has
    rand_comp = draw_masks(32, n, 0.5, step_generator(0, 3))[1]

    def pairs(c):
        d = np.zeros(n, bool)
        d[c.numpy()] = True
        return _neighbour_pairs(d, side)

    assert np.mean([pairs(c) for c in comp]) > 1.4 * np.mean([pairs(c) for c in rand_comp])
    # BEiT's generator directly: exact counts on small grids too (topped up when blocks cannot fit)
    import random

    rng = random.Random(0)
    for s, drop in ((14, 75), (8, 32), (4, 8), (2, 1)):
        m = block_mask(s, drop, rng, block_min=16, aspect=0.3)
        assert m.shape == (s * s,) and int(m.sum()) == drop
    with pytest.raises(ConfigError, match="masking"):
        load_config(None, ["masking=grid"], base=UTAConfig())


# ---- the student: what it sees, what it outputs -----------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"mlp": "gelu", "sub_ln": "false", "rope": "false", "abs_pos_embed": "false"}],
                         ids=["eva02-like", "plain-vit"])
def test_only_kept_positions_enter_the_student_and_the_loss(options):
    model = _student(**options)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    targets = torch.randn(2, 16, 8, requires_grad=True)
    pooled = torch.randn(2, 8, requires_grad=True)
    (keep,) = draw_masks(2, 16, 0.5, step_generator(0, 3), reversed_masking=False)
    loss = alignment_loss(model, x, targets, [keep], pooled, cls_weight=0.5)
    loss.backward()
    touched = targets.grad.abs().sum(-1) > 0
    expect = torch.zeros(2, 16, dtype=torch.bool)
    expect[torch.arange(2)[:, None], keep] = True
    assert torch.equal(touched, expect)  # the loss reads the teacher tokens at kept positions only
    assert (pooled.grad.abs().sum(-1) > 0).all()  # and the teacher's pooled embedding of every image

    # the masked patches never enter the student: changing their pixels changes no token and no CLS
    grid = torch.zeros(2, 16, dtype=torch.bool)
    grid[torch.arange(2)[:, None], keep] = True
    masked_px = ~grid.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 4, 4, 4).reshape(2, 3, 16, 16)
    noisy = torch.where(masked_px, torch.randint(0, 256, x.shape, dtype=torch.uint8), x)
    assert not torch.equal(noisy, x)
    with torch.no_grad():
        (tok_a, cls_a), (tok_b, cls_b) = model.features(noisy, keep), model.features(x, keep)
        assert torch.equal(tok_a, tok_b) and torch.equal(cls_a, cls_b)
        # the value: mean over kept tokens of 1 - cosine, plus the weight times the CLS term
        manual_tokens = (1 - F.cosine_similarity(tok_b, gather_tokens(targets, keep), dim=-1)).mean()
        manual_cls = (1 - F.cosine_similarity(cls_b, pooled, dim=-1)).mean()
        assert torch.allclose(loss, manual_tokens + 0.5 * manual_cls, atol=1e-6)
        assert torch.allclose(alignment_loss(model, x, targets, [keep]), manual_tokens, atol=1e-6)  # tokens only

    # reversed masking: image i twice (mask, complement): every position aligned once per image, two CLS terms
    targets.grad = None
    masks = draw_masks(2, 16, 0.5, step_generator(0, 3))
    alignment_loss(model, x, targets, masks).backward()
    assert (targets.grad.abs().sum(-1) > 0).all()
    with torch.no_grad():
        parts = alignment_losses(model, x, targets, masks, pooled)
        cls_terms = [1 - F.cosine_similarity(model.features(x, m)[1], pooled, dim=-1) for m in masks]
        assert torch.allclose(parts["cls"], torch.cat(cls_terms).mean(), atol=1e-6)
    # the image embedding is the CLS through the final norm and the head, on the whole image
    with torch.no_grad():
        full_tokens, full_cls = model.features(x)
        assert full_tokens.shape == (2, 16, 8) and torch.equal(model.embedding(x), full_cls)


def test_rope_rotates_each_kept_token_by_its_own_position():
    """With RoPE and no absolute position embeddings, position only enters through the rotation:
    the same patch content at another grid position gives another token, and the kept subset is
    rotated by its real positions (not 0..K-1)."""
    model = _student(abs_pos_embed="false")
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    keep = torch.tensor([[1, 6, 11, 12]])
    with torch.no_grad():
        for block in model.vit.blocks:  # sharp attention (at init it is nearly uniform, positions barely count)
            block.attn.q_proj.weight.mul_(30)
            block.attn.k_proj.weight.mul_(30)
        subset = model.features(x, keep)[0]
        full = model.features(x)[0]
        # the subset's token at position 6 attends to other tokens than in the full image; but a subset
        # holding every position is the full forward
        assert torch.allclose(model.features(x, torch.arange(16)[None])[0], full, atol=1e-6)
        e = model.embed(x)
        moved = keep.clone()
        moved[0, 1] = 7  # same contents, one of them claimed one column to the right (RoPE is relative:
        shifted = model.encode(gather_tokens(e, keep), moved)[0]  # a shift of every token changes little)
        assert not torch.allclose(shifted, subset, atol=1e-4)
        plain = _student(abs_pos_embed="false", rope="false")
        e = plain.embed(x)
        assert torch.allclose(plain.encode(gather_tokens(e, keep), keep + 1)[0],
                              plain.encode(gather_tokens(e, keep), keep)[0])  # no RoPE, no position at all


def test_student_is_eva02_as_the_reference_computes_it():
    """The student's encoder is EVA-02's ViT: with the same weights, a transcription of baaivision/EVA's
    modules (tests/eva02_reference.py: separate q/k/v with q/v biases, EVA's rotary tables, naive SwiGLU
    with sub-LN, no LayerNorm before the attention's projection) gives the same hidden states, and
    EVA-CLIP's variant (inner_attn_ln, rotary positions interpolated from a 16-grid) too."""
    from eva02_reference import EVA02Ref

    from featstore.models.eva02 import EVA02ViT

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for attn_ln, pt_grid in ((False, None), (True, 8)):
        ours = EVA02ViT(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=48, attn_sub_ln=attn_ln,
                        pt_grid=pt_grid)
        ours.init_weights()
        with torch.no_grad():  # non-trivial LayerNorms and biases, so a missing or misplaced one shows
            for name, p in ours.named_parameters():
                if name.endswith("bias") or "ln" in name or "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
                if "q_proj" in name or "k_proj" in name:  # sharp attention, so positions count
                    p.mul_(30)
        ref = EVA02Ref(32, 8, 32, 2, 2, 48, subln=True, inner_ln=attn_ln, pt_seq_len=pt_grid)
        assert ref.load_state_dict(ours.state_dict(), strict=True)  # EVA's parameter names, every one
        with torch.no_grad():
            want = ref(x)
            assert torch.allclose(ours(x), want, atol=2e-5)
            keep = torch.tensor([[0, 5, 9, 15], [2, 3, 12, 14]])  # a subset is rotated by its real positions
            sub = ours.encode(gather_tokens(ours.embed(x), keep), keep)
            assert sub.shape == (2, 5, 32)
            assert not torch.allclose(sub[:, 1:], gather_tokens(want[:, 1:], keep), atol=1e-3)  # attends to fewer
            model_rope_off = ours.rope
            ours.rope = None
            assert not torch.allclose(ours(x), want, atol=1e-3)  # the rotation matters
            ours.rope = model_rope_off


def test_student_options_build_what_they_say():
    from featstore.models.eva02 import DropPath, GeluMLP, SwiGLU

    model = _student(depth=3, drop_path=0.2)
    blocks = list(model.vit.blocks)
    assert isinstance(blocks[0].mlp, SwiGLU) and blocks[0].mlp.w1.out_features == round(16 * 8 / 3)
    assert isinstance(blocks[0].mlp.ffn_ln, torch.nn.LayerNorm)  # sub-LN before the MLP output projection
    assert isinstance(blocks[0].attn.inner_attn_ln, torch.nn.Identity)  # ... and none before the attention's (EVA-02-B)
    assert blocks[0].gamma_1 is None and blocks[0].gamma_2 is None  # no layer scale by default (EVA-02-B)
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)  # stochastic depth: 0 at the first block,
    assert [round(b.drop_path.drop_prob, 6) for b in blocks[1:]] == [0.1, 0.2]  # linear to drop_path at the last
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    assert model.arch["cls_head"] == "shared" and model.cls_head is None  # pooled width = token width: UTA's one head

    plain = _student(mlp="gelu", sub_ln="false", layer_scale=0.1)
    block = plain.vit.blocks[0]
    assert isinstance(block.mlp, GeluMLP) and block.mlp.fc1.out_features == 64
    assert isinstance(block.mlp.ffn_ln, torch.nn.Identity)
    assert torch.allclose(block.gamma_1, torch.full((16,), 0.1))

    # a teacher whose pooled width differs from its tokens' (raw --layer tokens): a CLS head of its own
    other = _student(pooled_dim=12)
    assert other.arch["cls_head"] == "separate" and other.embedding(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape == (1, 12)
    with pytest.raises(ConfigError, match="cls_head=separate"):
        _arch(pooled_dim=12, cls_head="shared")
    with pytest.raises(ConfigError, match="divisible by 4"):
        _arch(width=18, heads=3)  # head width 6: no 2D RoPE
    assert _arch(width=18, heads=3, rope="false")["rope"] is False
    assert not any("mask_token" in name for name, _ in model.named_parameters())  # UTA has no [MASK] token


def test_base_student_has_uta_b_parameter_count():
    """student=base with the defaults has exactly the parameters of UTA-B's released ViT-B/16
    (EVA-02-B: SwiGLU 2048 with its sub-LN, q/v biases, absolute positions, a 1024-d head), counted
    here from that architecture's description."""
    arch = resolve_arch(UTAConfig(student="base"), teacher_tokens=(196, 1024), pixels_shape=(3, 224, 224),
                        pixels_identity={}, teacher_pooled_dim=1024)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = UTAStudent(arch)
    d, h, depth = 768, 2048, 12
    block = (3 * d * d + 2 * d) + (d * d + d)  # q, k, v (q and v biases), proj; no LayerNorm between
    block += 2 * (d * h + h) + 2 * h + (h * d + d)  # SwiGLU w1, w2, its sub-LN, w3
    block += 2 * 2 * d  # norm1, norm2
    eva_b = 3 * 16 * 16 * d + d + d + 197 * d + depth * block + 2 * d + d * 1024 + 1024  # patches, cls, positions, norm, head
    assert count_parameters(model) == eva_b
    assert arch["patch_size"] == 16 and arch["grid"] == 14 and arch["mlp_dim"] == 2048


# ---- grids and flips -----------------------------------------------------------------------------------
def test_grid_interpolation_and_flips():
    t = torch.randn(3, 256, 8)
    out = interpolate_grid(t, 14)
    assert out.shape == (3, 196, 8) and out.dtype == torch.float32
    assert interpolate_grid(t, 16) is t  # same grid: untouched
    const = torch.ones(1, 49, 4) * torch.tensor([1.0, -2.0, 3.0, 0.5])
    assert torch.allclose(interpolate_grid(const, 14), torch.ones(1, 196, 4) * const[0, 0])  # 7x7 -> 14x14
    assert interpolate_grid(t, 14, "nearest").shape == (3, 196, 8)
    # a /14 teacher at 224 (16x16) and a /16 student (14x14): resized and recorded
    arch = resolve_arch(UTAConfig(patch_size=16), teacher_tokens=(256, 512), pixels_shape=(3, 224, 224), pixels_identity={})
    assert (arch["grid"], arch["teacher_grid"], arch["grid_interpolation"]) == (14, [16, 16], "bilinear")
    default = resolve_arch(UTAConfig(), teacher_tokens=(256, 512), pixels_shape=(3, 224, 224), pixels_identity={})
    assert (default["patch_size"], default["grid"], default["grid_interpolation"]) == (14, 16, None)
    assert (default["width"], default["depth"], default["heads"]) == (192, 12, 3)
    assert resolve_arch(UTAConfig(student="base"), teacher_tokens=(196, 512), pixels_shape=(3, 224, 224))["heads"] == 12
    with pytest.raises(ConfigError, match="square"):
        resolve_arch(UTAConfig(), teacher_tokens=(50, 8), pixels_shape=(3, 224, 224))
    with pytest.raises(ConfigError, match="divide"):
        resolve_arch(UTAConfig(patch_size=15), teacher_tokens=(49, 8), pixels_shape=(3, 224, 224))

    # flips mirror the pixels and the teacher grid together: patch (r, c) keeps its own target
    g, p = 4, 4
    cols = torch.arange(g).repeat_interleave(p)  # pixel column -> patch column
    pixels = cols.view(1, 1, 1, -1).expand(2, 3, g * p, g * p).to(torch.uint8)
    tokens = torch.arange(g).repeat(g).view(1, g * g, 1).expand(2, g * g, 2).float()  # token (r, c) = c
    arch = resolve_arch(UTAConfig(), teacher_tokens=(g * g, 2), pixels_shape=(3, g * p, g * p), pixels_identity={})
    x, tgt = prepare_batch({"input": pixels, "target": tokens.half()}, arch, torch.tensor([True, False]), torch.device("cpu"))
    patch_col = x[:, 0, ::p, ::p].reshape(2, -1).float()  # each patch's pixel value after the flip
    assert torch.equal(patch_col, tgt[..., 0])
    assert torch.equal(x[1], pixels[1]) and not torch.equal(x[0], pixels[0])
    assert torch.equal(flip_tokens(flip_tokens(t, torch.ones(3, dtype=torch.bool)), torch.ones(3, dtype=torch.bool)), t)


def test_token_x_channel_int8_is_dequantized_on_the_device():
    """int8 teacher tokens with a token scale and a channel scale (featstore.tokens) come back as
    the library dequantizes them."""
    from featstore.tokens import dequantize_int8, quantize_int8_token_channel

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 16, 8)).astype(np.float32)
    tokens[..., 3] *= 50
    q, ts, cs = quantize_int8_token_channel(tokens)
    arch = resolve_arch(UTAConfig(), teacher_tokens=(16, 8), pixels_shape=(3, 16, 16), pixels_identity={})
    batch = {"input": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "target": torch.from_numpy(q),
             "target_scale": torch.from_numpy(ts), "target_channel_scale": torch.from_numpy(cs)}
    _, t = prepare_batch(batch, arch, None, torch.device("cpu"))
    assert torch.allclose(t, torch.from_numpy(dequantize_int8(q, ts, np.float32, channel_scale=cs)), atol=1e-5)
