"""Attach the supernet to a model, and take it off again.

``attach(model, space)`` freezes the base model, wraps every site in a :class:`BottleneckSite`,
builds the :class:`ModuleBank` holding every candidate, registers it on the model (so
``model.to(...)`` and ``model.parameters()`` see it) and returns a :class:`Supernet` handle.
``handle.detach()`` restores the original modules and ``requires_grad`` flags.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .bank import ModuleBank
from .layout import Block
from .modules import BottleneckSite
from .optim_state import check_carriable
from .space import SearchSpace, SpaceConfig

BANK_ATTR = "prunepeft_bank"
#: the task-head modules kept trainable by default (and whose last ``nn.Linear`` is a model's output
#: layer: BERT/DeBERTa ``classifier``, RoBERTa ``classifier.out_proj``, Llama/Mistral/Qwen2 ``score``)
DEFAULT_HEADS = ("classifier", "score")


class Supernet:
    """Handle on a model with the supernet attached."""

    def __init__(self, model: nn.Module, space: SearchSpace, bank: ModuleBank, saved: dict) -> None:
        self.model = model
        self.space = space
        self.bank = bank
        self._saved = saved
        self._attached = True

    # ------------------------------------------------------------------ parameters
    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules kept trainable besides the candidates (e.g. the classifier)."""
        return list(self._saved["head_params"])

    def parameters(self) -> Iterator[nn.Parameter]:
        """Everything that trains: the bank's flat tensor, then the head parameters."""
        yield self.bank.flat
        yield from self._saved["head_params"]

    def num_trainable(self, include_head: bool = False, effective: bool = True) -> int:
        """Trainable parameters of the candidates (unmasked ones if ``effective``), plus the head if asked."""
        n = self.bank.num_params(effective=effective)
        if include_head:
            n += sum(p.numel() for p in self._saved["head_params"])
        return n

    def optimizer(self, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
        """An AdamW over the bank and the head (the bank is one tensor: one optimizer steps it)."""
        return torch.optim.AdamW(list(self.parameters()), lr=lr, weight_decay=weight_decay, **kwargs)

    # ------------------------------------------------------------------ pruning
    def mask_blocks(self, blocks: Sequence[int]) -> None:
        self.bank.mask_blocks(blocks)

    def mask_candidates(self, names_or_ids: Sequence[int | str]) -> None:
        self.bank.mask_candidates([self.candidate_id(c) for c in names_or_ids])

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the masked blocks for real (see :meth:`ModuleBank.compact`)."""
        self.bank.compact(optimizer=optimizer)

    def candidate_id(self, name_or_id: int | str) -> int:
        if isinstance(name_or_id, int):
            if not 0 <= name_or_id < self.bank.num_candidates:
                raise ValueError(f"candidate id {name_or_id} out of range [0, {self.bank.num_candidates})")
            return name_or_id
        for i, s in enumerate(self.bank.specs):
            if s.name == name_or_id:
                return i
        raise ValueError(f"no candidate named {name_or_id!r}")

    def prune_to_budget(
        self,
        budget: int,
        scores: torch.Tensor,
        granularity: str = "block",
        optimizer: torch.optim.Optimizer | None = None,
        compact: bool = True,
    ) -> list[int]:
        """Prune the lowest-scoring blocks (or whole candidates) until at most ``budget`` parameters train.

        ``scores`` are per current block (``granularity="block"``) or per candidate (``"module"``),
        low = prune first; ties go to the lower id. Returns the pruned ids. Compacts the bank
        afterwards unless ``compact=False`` (then the pruned blocks are only masked).
        """
        bank = self.bank
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
        if optimizer is not None:
            check_carriable(optimizer, bank.flat)  # fail before masking anything
        scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
        mask = bank.block_mask.cpu()
        if granularity == "block":
            n = bank.num_blocks
            cand_of = bank.plan["block"][:, Block.CAND]
            costs = torch.tensor([bank.block_cost(int(c)) for c in cand_of], dtype=torch.int64)
            group, eligible = cand_of.clone(), mask.clone()
            extra = torch.tensor(
                [bank.candidate_extra(c) for c in range(bank.num_candidates)], dtype=torch.int64
            )
            if any(not m for m in mask.tolist()):  # masked blocks count as pruned members
                raise ValueError("prune_to_budget: compact or unmask the bank before pruning again")
        elif granularity == "module":
            n = bank.num_candidates
            costs = torch.tensor([bank.candidate_params(c) for c in range(n)], dtype=torch.int64)
            group, extra = torch.arange(n), torch.zeros(n, dtype=torch.int64)
            eligible = costs > 0
        else:
            raise ValueError(f"granularity must be 'block' or 'module', got {granularity!r}")
        if scores.shape != (n,):
            raise ValueError(
                f"scores must have shape ({n},) for granularity {granularity!r}, got {tuple(scores.shape)}"
            )
        current = bank.num_params()
        pruned = bank.backend.select_prune(scores, costs, group, extra, eligible, current, budget).tolist()
        before = bank.block_mask.clone()
        if granularity == "block":
            bank.mask_blocks(pruned)
        else:
            bank.mask_candidates(pruned)
        if bank.num_params() > budget:
            bank.set_block_mask(before)  # leave the model as it was
            raise ValueError(f"budget {budget} is below what pruning every eligible candidate can reach")
        if compact:
            bank.compact(optimizer=optimizer)
        return pruned

    # ------------------------------------------------------------------ detach
    def detach(self) -> nn.Module:
        """Restore the original modules and ``requires_grad`` flags; returns the model."""
        if not self._attached:
            raise RuntimeError("the supernet is already detached")
        for name, site in self._saved["sites"].items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, site.base)
        for p, flag in self._saved["requires_grad"]:
            p.requires_grad_(flag)
        for mod, flag in self._saved["bnb_cpu"]:
            mod.support_avx512bf16_for_cpu = flag
        delattr(self.model, BANK_ATTR)
        self._attached = False
        return self.model

    def __repr__(self) -> str:
        return f"Supernet({self.space.describe()}; trainable now {self.num_trainable():,})"


def attach(model: nn.Module, space: SearchSpace | SpaceConfig | None = None) -> Supernet:
    """Inject every candidate of ``space`` into ``model`` and freeze the base.

    ``space`` may be a :class:`SearchSpace` built for this model, or a :class:`SpaceConfig` (the space
    is then enumerated here). The model's output is unchanged right after attaching (all
    up-projections start at zero). The head modules named by ``SpaceConfig.trainable_modules``
    (default: ``classifier``/``score``) stay trainable.
    """
    if hasattr(model, BANK_ATTR):
        raise ValueError("a prunepeft supernet is already attached to this model; detach() it first")
    if space is None or isinstance(space, SpaceConfig):
        space = SearchSpace.from_model(model, space)
    config = space.config
    device = _model_device(model)
    bank = ModuleBank(space.candidates, dtype=config.torch_dtype, device=device, seed=config.seed)

    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    heads = DEFAULT_HEADS if config.trainable_modules is None else tuple(config.trainable_modules)
    head_params: list[nn.Parameter] = []
    found_heads = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name and (leaf in heads or name in heads):
            found_heads.add(leaf if leaf in heads else name)
            for p in mod.parameters():
                if p.is_floating_point() and all(p is not q for q in head_params):
                    p.requires_grad_(True)
                    head_params.append(p)
    if config.trainable_modules is not None and set(heads) - found_heads:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        raise ValueError(f"SpaceConfig.trainable_modules: no module named {sorted(set(heads) - found_heads)}")

    sites: dict[str, BottleneckSite] = {}
    saved_flags_4bit: list[tuple[nn.Module, bool]] = []
    for mod in model.modules():  # every 4-bit layer: non-site ones see inputs that require grad too
        _keep_4bit_trainable(mod, saved_flags_4bit)
    site_names = dict.fromkeys(c.site for c in space.candidates)
    for name in site_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        site = BottleneckSite(base, name, bank)
        setattr(parent, child, site)
        sites[name] = site
    setattr(model, BANK_ATTR, bank)
    return Supernet(model, space, bank, {
        "sites": sites, "requires_grad": saved_flags, "head_params": head_params, "bnb_cpu": saved_flags_4bit,
    })  # fmt: skip


def _keep_4bit_trainable(base: nn.Module, saved: list[tuple[nn.Module, bool]]) -> None:
    """Keep a bitsandbytes ``Linear4bit`` in the layout its backward supports.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference the first time the
    layer runs in eval mode without grad, and its training path then fails on the repacked weight
    (so "evaluate, then train", as every search round does, would break). The module's public
    ``support_avx512bf16_for_cpu`` switch turns that repack off while the supernet is attached;
    ``state_dict()`` (bitsandbytes' own save path) undoes a repack that already happened.
    """
    if not hasattr(base, "support_avx512bf16_for_cpu") or not hasattr(base, "weight"):
        return
    saved.append((base, base.support_avx512bf16_for_cpu))
    base.support_avx512bf16_for_cpu = False
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        base.state_dict()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
