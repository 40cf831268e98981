"""``SearchConfig``: everything a search needs besides the model and the data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .pruner import PruneConfig
from .space import SpaceConfig

FINAL_INITS = ("reinit", "continue")


def default_search_space() -> SpaceConfig:
    """The search's default candidates: LoRA r=8 on every linear of every layer and serial adapters of
    width 8 after attention and after the FFN, in blocks of 4 units (see README, "defaults")."""
    return SpaceConfig(lora_targets=("all",), lora_rank=8, serial_adapter_targets=("attn", "ffn"), adapter_width=8,
                       block_size=4)  # fmt: skip


TASK_KINDS = ("classification", "regression", "causal_lm")


@dataclass
class SearchConfig(PruneConfig):
    """Everything a search needs besides the model and the data (see :class:`PruneConfig` for pruning).

    Attributes:
        space: the supernet's candidates (:class:`SpaceConfig`); default :func:`default_search_space`.
        budget: trainable parameters to end with: an int, a percentage of the base model's
            parameters (``"0.5%"``), a fraction of them (a float below 1, ``0.005``), or None for
            the size of peft LoRA r=8 on q,v.
        lr: peak AdamW learning rate; weight_decay: AdamW weight decay.
        lr_warmup_ratio: fraction of a phase's steps spent warming the learning rate up.
        max_grad_norm: gradient clipping (None or 0: off). grad_accum: micro-batches per step.
        batch_size, eval_batch_size, max_length: batching and truncation of text data.
        precision: ``auto`` (bf16 on CUDA that supports it, else fp32), ``fp32``, ``bf16``, ``fp16``.
        warmup_subset: if set, the warm-up trains on this many class-balanced training examples
            (the paper's low-fidelity mode); None uses the full training data.
        final_steps: steps of final training of the found configuration (0: none).
        final_init: ``reinit`` (paper: train the found configuration from scratch, head included)
            or ``continue`` (keep the search's weights and optimizer state).
        final_lr: learning rate of the final training (default: ``lr``).
        val_examples: the validation split carved out of the training data (deterministic,
            class-stratified; see :meth:`prunepeft.data.Task.split_validation`): an int, a fraction
            in (0, 1), or None for the default (10 %, at most 1,000); 0 for none. Every in-search
            evaluation reads it; the eval set is read once, for the final metric.
        round_eval_examples: validation examples evaluated after each round (None: all of them;
            0, the default: none); a report, never a decision. Each evaluation costs about one
            training step per 64 examples, so it is off by default (the search is meant to cost little
            more than its final training); the found configuration is evaluated on the validation
            split after the final training either way.
        max_bad_steps: consecutive non-finite steps tolerated before the search stops.
        task_kind: for pre-batched data: classification, regression or causal_lm.
    """

    space: SpaceConfig = field(default_factory=default_search_space)
    budget: int | float | str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    precision: str = "auto"
    warmup_subset: int | None = None
    final_steps: int = 500
    final_init: str = "reinit"
    final_lr: float | None = None
    val_examples: int | float | None = None
    round_eval_examples: int | None = 0
    max_bad_steps: int = 10
    task_kind: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.space, dict):
            self.space = SpaceConfig(**self.space)
        if self.final_init not in FINAL_INITS:
            raise ValueError(f"final_init must be one of {', '.join(FINAL_INITS)}, got {self.final_init!r}")
        for name in ("batch_size", "eval_batch_size", "max_length", "grad_accum", "max_bad_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if (
            isinstance(self.final_steps, bool)
            or not isinstance(self.final_steps, int)
            or self.final_steps < 0
        ):
            raise ValueError(f"final_steps must be an integer >= 0, got {self.final_steps!r}")
        for name in ("lr", "final_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ValueError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.warmup_subset is not None and self.warmup_subset < 1:
            raise ValueError(f"warmup_subset must be None or >= 1, got {self.warmup_subset}")
        v = self.val_examples
        if v is not None and (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (isinstance(v, float) and not 0 < v < 1)
            or v < 0
        ):
            raise ValueError(f"val_examples must be None, an integer >= 0 or a fraction in (0, 1), got {v!r}")
        v = self.round_eval_examples
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"round_eval_examples must be None or an integer >= 0, got {v!r}")
        if self.task_kind not in (None, *TASK_KINDS):
            raise ValueError(
                f"task_kind must be classification, regression or causal_lm, got {self.task_kind!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adalora_betas"] = list(self.adalora_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SearchConfig fields: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("space"), dict):
            d["space"] = SpaceConfig(**d["space"])
        return cls(**d)
