"""The ShareLock head's configuration: `Config`, loaded by `trainers/config.py` from a YAML file and
`--set KEY=VALUE` overrides.

    cfg = load_config("demo", ["steps=200", "lr=3e-4"])     # a built-in config by name, or a YAML path

The model and optimiser defaults are ShareLock's published ones (Ruthardt et al., 2024): a 4-layer
language MLP at width 4096 with BatchNorm and dropout 0.2, identity vision head, symmetric InfoNCE
at a fixed logit scale of 1/0.07, Adam (lr 1e-3, weight decay 1e-4), 150 warm-up steps then cosine,
grad-norm clip 1.0, micro-batches of 1024 (negatives only within a micro-batch) accumulated 16
times, 5000 steps.  The training protocol defaults suit any store (10% held out, validation every
steps/10, patience 5); `configs/sharelock.yaml` sets the official protocol (50,000 held-out rows,
validation every 500 micro-batches, patience 50 with min_delta 0.1, warm-up from lr 0, logit scale
exp(2.6592)).  Unknown keys and badly typed values are refused with one line that lists the valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from featstore.trainers import config as configs
from featstore.trainers.config import ConfigBase, need


# what validation measures (train_head.validate): the loss is lower-is-better, the recalls higher
VAL_SPLITS = ("hash", "official")
BEST_METRICS = ("val_loss", "val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5")


@dataclass
class Config(ConfigBase):
    # ---- the heads ----
    num_layers: int = 4  # language head: num_layers-1 blocks of Linear-BN-ReLU-Dropout, then a Linear
    hidden_dim: int = 4096
    dropout: float = 0.2
    vision_head: str = "identity"  # identity | mlp
    vision_num_layers: int = 2  # used when vision_head is mlp
    vision_hidden_dim: int = 4096
    embed_dim: int | None = None  # the shared space; None = the vision feature width
    logit_scale: float = 1 / 0.07
    learnable_logit_scale: bool = False
    # ---- optimisation ----
    steps: int = 5000  # optimizer steps
    batch_size: int = 1024  # one micro-batch: the negatives of each row are the rest of its micro-batch
    accumulation_steps: int = 16  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 150
    max_warmup_fraction: float = 0.1  # warm-up never longer than this fraction of `steps`
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    warmup_from_zero: bool = False  # the first warm-up update gets lr 0 (ShareLock's schedule), else lr / warmup
    grad_clip: float = 1.0  # max grad norm; 0 turns clipping off
    # ---- data ----
    seed: int = 0  # model init, dropout, the data order and which text set each row gets
    val_fraction: float = 0.1  # held out by uid hash (featstore.split), the same split for eval
    val_rows: int | None = None  # hold out exactly this many rows (smallest uid hash) instead; ShareLock: 50000
    val_split: str = "hash"  # how val_rows are chosen: "hash" (smallest uid hash) or "official" (ShareLock's shuffle)
    val_seed: int = 42  # val_split "official": the seed of ShareLock's random.Random(seed).shuffle (its config.seed)
    skip_duplicates: str | None = None  # a `featstore dedup` record ("exact" or a feature set): its duplicates are left out of training
    cache: str | None = None  # None streams from the store; "ram" reads the train columns once
    shuffle_window: int | None = None  # the loader's read window per rank, in rows; None = the loader's default (by bytes)
    cpu_threads: int | None = None  # torch threads when training on CPU; None = torch's default (small heads: 1 is fastest)
    # ---- validation, early stopping, checkpoints ----
    val_every: int | None = None  # None = steps // 10; never more than that
    val_every_batches: int | None = None  # validate after every this many micro-batches instead (ShareLock: 500)
    val_max_rows: int = 10000  # retrieval recall during training on at most this many val rows
    best_metric: str = "val_loss"  # picks the best checkpoint and drives early stopping (or val_i2t_r1, ...: higher)
    patience: int | None = 5  # stop after this many validations without an improvement; None = never
    min_delta: float = 0.0  # an improvement must beat the best by more than this (ShareLock: 0.1)
    save_every: int = 500  # write the `last` checkpoint every this many steps (and at the end)
    log_every: int = 10  # a metrics.jsonl line every this many steps (and on validation steps)

    def validate(self) -> "Config":
        need(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        need(self.vision_num_layers >= 1, f"vision_num_layers must be >= 1, got {self.vision_num_layers}")
        need(self.hidden_dim >= 1 and self.vision_hidden_dim >= 1, "hidden widths must be >= 1")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.vision_head in ("identity", "mlp"), f"vision_head must be identity or mlp, got {self.vision_head!r}")
        need(self.embed_dim is None or self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}")
        need(self.logit_scale > 0, f"logit_scale must be > 0, got {self.logit_scale}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        need(self.accumulation_steps >= 1, f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        need(self.val_max_rows >= 2, f"val_max_rows must be >= 2, got {self.val_max_rows}")
        need(self.patience is None or self.patience >= 1, f"patience must be >= 1 or null, got {self.patience}")
        need(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        need(self.best_metric in BEST_METRICS, f"best_metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        need(self.val_rows is None or self.val_rows >= 2, f"val_rows must be >= 2 or null, got {self.val_rows}")
        need(self.val_split in VAL_SPLITS, f"val_split must be one of {', '.join(VAL_SPLITS)}, got {self.val_split!r}")
        need(self.val_split == "hash" or self.val_rows is not None,
             "val_split official holds out val_rows rows (ShareLock's val_split_num): set val_rows")
        need(self.val_every_batches is None or self.val_every_batches >= 1,
             f"val_every_batches must be >= 1 or null, got {self.val_every_batches}")
        self._check_common()
        return self


def load_config(config_file=None, overrides=(), base: Config | None = None) -> Config:
    """`trainers/config.py:load_config` with ShareLock's defaults as the base."""
    return configs.load_config(config_file, overrides, base=base if base is not None else Config())


def valid_keys() -> list[str]:
    return configs.valid_keys(Config)
