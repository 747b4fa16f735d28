"""UTA (Unmasked Token Alignment): a ViT student whose unmasked tokens match a frozen teacher's.

The teacher (a CLIP vision tower, say) ran once at extraction: `features/<teacher>/tokens` holds its
patch tokens (N, T, D), `features/<teacher>/pooled` its image embedding and `pixels/<name>` the
exact uint8 crop it saw.  Extracted with `--views K`, each image has K such crops (a view axis:
view 0 the centre crop, the others random-resized crops, some mirrored, each with the teacher's own
outputs); the training loader serves one view per image per epoch (`Loader(view="epoch")`, the
same view in pixels, tokens and pooled), validation view 0.  A training step:

1. draws masks per sample (`masks.draw_masks`: uniform random or BEiT-style blocks, a pure
   function of (seed, step), so a resumed run draws the same masks); `mask_ratio` of the grid
   positions are dropped;
2. embeds the input once (patches of the pixels + position embeddings), GATHERS the kept positions
   and runs the encoder (`student.UTAStudent`, EVA-02-like) on those only: no [MASK] tokens,
   so the student costs ~(1 - mask_ratio) of a full forward, and what it says at a kept position
   cannot depend on a dropped patch;
3. maps each output token through the head (student width -> teacher width) and scores
   1 - cosine against the teacher token at the same grid position, and the CLS through the same
   final norm and head against the teacher's pooled embedding, weighted by `cls_weight`
   (`alignment_losses`).  The CLS embedding is the student's image embedding (zero-shot reads it).

Reversed masking (the complement view): each image appears twice, once with its mask and once
with the complement, so every position is aligned every step.  With mask_ratio 0.5 the two halves
have the same length and run as one batch of 2B sequences of N/2 tokens, which costs the same as
one unmasked forward of B.

Grids: the student's grid is (stored crop size / student patch).  By default the student patch is
the teacher's (crop / teacher grid side), so grids match; when they differ (a /14 teacher at 224 is
16x16, a /16 student 14x14) the teacher grid is resized to the student's (`interpolate_grid`,
bilinear on the (D, h, w) map), recorded in the checkpoint.

Light mode (`student_input=<feature set>`): the student's input is another backbone's stored tokens
(e.g. DINOv2's) instead of pixels: a LayerNorm, a 1x1 "patch" projection of the token grid, then the
same (small) transformer.  Both feature sets must come from the same crop (`same_crop`).

No pretrained weights, no backbone, no image decoding.

Where each part lives: `config.py` (UTAConfig), `arch.py` (the student's architecture from the
store's shapes), `masks.py`, `student.py` (the EVA-02-like ViT), `batch.py` (a loader batch on the
device: grids, flips, int8), `loss.py` (the alignment loss), `checkpoint_format.py`, `teacher.py`,
`stored_views.py`, `fresh_crops.py` (a new crop every step, its targets), `train.py` (the training loop, read top to bottom) and `evaluate.py`.
"""
