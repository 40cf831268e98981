"""``prunepeft plan``: will a search fit on a GPU, before any weights are loaded? (ARCHITECTURE.md §5b)

The model is built from its ``config.json`` on the meta device (shapes, no storage) and the
supernet is attached there with :func:`prunepeft.supernet.attach`, so the candidates and their
parameter counts are exactly those a real search gets. The memory estimate is a sum of named terms,
each carrying the formula that produced it:

- **base weights** in the chosen precision. Dense: parameters x bytes of the dtype. 4-bit
  (bitsandbytes NF4 with double quantisation, as the CLI loads it): every ``nn.Linear`` but the
  heads (``lm_head``, ``score``, ``classifier``) stores 0.5 byte per weight, one 8-bit absmax per
  64-weight block, and one fp32 absmax per 256 of those (the second level) plus one fp32 offset per
  tensor, about 0.5159 byte per weight; embeddings, norms, biases and the heads stay in ``dtype``.
- **the bank**: fp32 masters + gradients + AdamW ``exp_avg``/``exp_avg_sq`` (4 + 4 + 8 bytes per
  trainable parameter for a float32 bank), and the AdaLoRA sensitivity/uncertainty every search
  keeps per element (2 x 4 bytes). The trainable head adds its gradients and AdamW state.
- **activations**: what autograd keeps for the backward pass with the base frozen (measured against
  ``torch.autograd.graph.saved_tensors_hooks`` on small models; see ``tests/test_plan.py``). A frozen
  linear keeps nothing (its weight is there anyway), so per token, for every layer from the first
  one holding candidates upwards:

  * attention (SDPA / flash): q, k, v and the output, ``3 d_q + d_o`` elements (k and v repeated to
    all query heads: transformers does so for GQA whenever a padding mask is passed), the softmax
    log-sum-exp (4 bytes per head) and the padding mask row (``T`` elements); eager attention keeps
    the probabilities instead, ``heads x T x (4 + b)`` bytes;
  * FFN: the activation's input, and for a gated FFN also its output and the up projection
    (``3 f`` elements, else ``f``);
  * norms: their input, upcast to fp32 by the RMSNorm of Llama-family models (4 bytes per element
    plus 4 per token; ``nn.LayerNorm``: ``b`` per element plus 8 per token);
  * candidates: the tensor each candidate reads, in the bank's dtype (one copy per layout group:
    training computes the sites sharing an input together on either path; shared when no cast is needed), and the
    bottleneck units (Triton: ``z`` in fp32; reference: ``h`` for LoRA, ``h`` and ``act(h)`` for
    adapters);
  * once: the final norm's input, and for causal LM the logits (``V x (b + 4 + 4)`` bytes: the
    returned logits, the fp32 log-softmax kept by the loss, its gradient at the start of backward);
    for classification the head's input.

  ``b`` is the activation dtype's size. Every batch is taken as ``batch_size x max_length`` tokens
  with a padding mask. Not counted: dropout masks (decoder LLMs train without dropout), transient
  buffers inside one op, allocator fragmentation; a fixed 0.5 GiB stands for the CUDA context and
  library workspaces.

The estimate is given per phase as the bank shrinks: the supernet trains through the warm-up and
round 1, round ``r`` trains at the target of round ``r - 1`` (:func:`prunepeft.scheduler.round_targets`),
the final training at the budget; compaction briefly holds the bank's state twice (old and new).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .bank import KINDS, ModuleBank
from .config import default_search_space
from .scheduler import SCHEDULES, base_param_count, default_budget, resolve_budget, round_targets
from .space import ARCHITECTURES, SearchSpace, SpaceConfig, _find_layers, _resolve_arch
from .supernet import attach

TASKS = ("causal_lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("triton", "reference")
#: heads the CLI's 4-bit loader keeps dense (``llm_int8_skip_modules``)
QUANT_SKIP = ("lm_head", "score", "classifier")
NF4_BLOCK = 64  # weights per NF4 block (one absmax each)
NF4_DQ_BLOCK = 256  # absmax values per second-level block (double quantisation)
RUNTIME_ALLOWANCE = 512 * 2**20  # CUDA context and library workspaces (rough, fixed)
#: attention blocks of a layer: (query role, fused q/k/v role, output role)
_ATTN_ROLES = (("q", "qkv", "o"), ("cross_q", None, "cross_o"))
GIB = 2**30


@dataclass(frozen=True)
class SpaceSlice:
    """Candidates and trainable parameters in one slice of the space (a kind, a depth partition, a role).

    Attributes:
        name: the slice (``lora``; ``0-20%``; ``q``).
        candidates: candidates in it.
        params: their trainable parameters (as :meth:`ModuleBank.candidate_params` counts them).
        params_by_kind: ``params`` split by candidate kind (every kind of :data:`KINDS`).
        detail: extra description (the layers of a depth partition).
    """

    name: str
    candidates: int
    params: int
    params_by_kind: dict[str, int]
    detail: str = ""


@dataclass(frozen=True)
class MemoryTerm:
    """One term of the memory estimate, for the supernet at full size.

    Attributes:
        name: what it is.
        bytes: its size.
        formula: how it was computed, with the numbers.
        category: ``weights``, ``optimizer`` (bank and head state), ``activations`` or ``runtime``.
        shrinks: whether it scales with the bank's trainable parameters (then a phase training
            ``p`` parameters holds ``bytes * p / supernet_params``).
    """

    name: str
    bytes: int
    formula: str
    category: str
    shrinks: bool = False


@dataclass(frozen=True)
class Phase:
    """Memory while one phase of the search trains.

    Attributes:
        name: ``warm-up + round 1``, ``round 2`` ..., ``final training``.
        trainable_params: bank parameters trained in the phase.
        optimizer_bytes: bank and head state (masters, gradients, AdamW, statistics).
        activation_bytes: activations kept for the backward pass.
        total_bytes: everything at the phase's peak (weights, state, activations, runtime).
        compaction_bytes: the peak while the bank compacts at the end of the phase (old and new
            state together, activations freed); 0 for the final training.
    """

    name: str
    trainable_params: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    compaction_bytes: int


@dataclass
class Plan:
    """What a search on a model will train and how much GPU memory it needs (see the module doc).

    Attributes:
        model_type, task, num_layers, hidden_size, vocab_size: the model.
        space: :meth:`SearchSpace.describe` of the supernet.
        base_params: parameters of the base model (4-bit weights by their logical shape).
        base_precision: how the base weights are stored; activation_dtype: the activations' dtype;
            bank_dtype: the candidates' dtype (``SpaceConfig.dtype``).
        num_candidates, supernet_params: candidates and their trainable parameters before pruning.
        head_params: parameters of the trainable head (classification), trained besides the bank.
        by_kind, by_partition, by_role: the candidates and parameters broken down.
        budget: trainable parameters at the end; budget_source: where it came from.
        rounds, schedule, targets: the pruning schedule and each round's target.
        batch_size, max_length: the batch the activations are estimated for.
        backend: the candidates' kernel path the activations are estimated for.
        memory: the estimate's terms for the supernet at full size.
        phases: the estimate per phase as the bank shrinks.
        gpu_memory_bytes: the GPU's memory, if given (then :attr:`fits` answers).
        notes: what the estimate assumes or leaves out.
    """

    model_type: str
    task: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    space: str
    base_params: int
    base_precision: str
    activation_dtype: str
    bank_dtype: str
    num_candidates: int
    supernet_params: int
    head_params: int
    by_kind: list[SpaceSlice]
    by_partition: list[SpaceSlice]
    by_role: list[SpaceSlice]
    budget: int
    budget_source: str
    rounds: int
    schedule: str
    targets: list[int]
    batch_size: int
    max_length: int
    backend: str
    memory: list[MemoryTerm]
    phases: list[Phase]
    gpu_memory_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def budget_percent(self) -> float:
        """The budget as a percentage of the base model's parameters."""
        return 100.0 * self.budget / self.base_params

    @property
    def peak_bytes(self) -> int:
        """The largest estimate over all phases, compaction included."""
        return max(max(p.total_bytes, p.compaction_bytes) for p in self.phases)

    @property
    def fits(self) -> bool | None:
        """Whether :attr:`peak_bytes` fits in ``gpu_memory_bytes`` (None when no GPU size was given)."""
        return None if self.gpu_memory_bytes is None else self.peak_bytes <= self.gpu_memory_bytes

    def term(self, name: str) -> MemoryTerm:
        """The memory term called ``name``."""
        for t in self.memory:
            if t.name == name:
                return t
        raise KeyError(f"no memory term {name!r}; terms: {', '.join(t.name for t in self.memory)}")

    def category_bytes(self, category: str) -> int:
        """Sum of the full-size terms of one category (``weights``, ``optimizer``, ``activations``, ``runtime``)."""
        return sum(t.bytes for t in self.memory if t.category == category)


# ---------------------------------------------------------------------------------------- the model
def load_config(model_or_config):
    """A ``transformers.PretrainedConfig`` from a model directory, a ``config.json`` path or a config.

    Reads the file only (nothing is downloaded); raises ``ValueError`` for a path without a
    ``config.json`` or a model type transformers does not know.
    """
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return copy.deepcopy(model_or_config)
    if not isinstance(model_or_config, (str, Path)):
        raise ValueError(
            "plan: model_or_config must be a model directory, a config.json path or a transformers "
            f"PretrainedConfig, got {type(model_or_config).__name__}"
        )
    path = Path(model_or_config)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no config.json" if path.is_dir() else f"{path} does not exist"
        raise ValueError(f"plan: {where}; pass a transformers model directory or its config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"plan: {file} is not a JSON config: {e}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise ValueError(f"plan: {file} has no model_type; is it a transformers config.json?")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"plan: model type {model_type!r} in {file} is not known to transformers; prunepeft supports "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return CONFIG_MAPPING[model_type].from_dict(data)


def build_meta_model(config, task: str = "causal_lm", num_labels: int = 2) -> nn.Module:
    """The transformers model of ``config`` on the meta device: every shape, no storage, no init.

    ``task``: ``causal_lm`` (a seq2seq LM for encoder-decoder configs) or ``classification`` (a
    sequence-classification head with ``num_labels`` labels).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"plan: task must be one of {', '.join(TASKS)}, got {task!r}")
    config = copy.deepcopy(config)
    if task == "classification":
        config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"plan: cannot build a {task} model of type {config.model_type!r}: {e}") from None


# ---------------------------------------------------------------------------------------- the plan
def plan_model(
    model_or_config,
    space: SpaceConfig | None = None,
    *,
    load_in_4bit: bool = False,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    max_length: int = 512,
    budget: int | float | str | None = None,
    rounds: int = 4,
    schedule: str = "linear",
    task: str = "causal_lm",
    num_labels: int = 2,
    backend: str = "triton",
    gpu_memory_gib: float | None = None,
) -> Plan:
    """Plan a search on a model from its config alone: candidates, parameters, budget and memory.

    Args:
        model_or_config: a model directory holding ``config.json``, the path of a ``config.json``,
            or a ``transformers.PretrainedConfig``.
        space: the supernet's candidates (default: :func:`~prunepeft.config.default_search_space`,
            as ``search()`` and ``prunepeft search``).
        load_in_4bit: the base's linears in NF4 with double quantisation (bitsandbytes).
        dtype: dtype of the dense base weights (all of them, or the non-quantized ones under 4-bit)
            and of the activations: ``float32``, ``bfloat16`` or ``float16``.
        batch_size, max_length: the training batch (``batch_size x max_length`` tokens).
        budget: trainable parameters to end with: int, ``"0.5%"`` of the base, a fraction below 1,
            or None for peft LoRA r=8 on q, v (:func:`prunepeft.scheduler.default_budget`).
        rounds, schedule: the pruning rounds and their schedule (``linear`` or ``cubic``).
        task: ``causal_lm`` or ``classification`` (then ``num_labels`` labels).
        backend: the candidates' kernels the activations are estimated for: ``triton`` (the GPU
            path) or ``reference`` (pure torch).
        gpu_memory_gib: the GPU's memory in GiB, to answer :attr:`Plan.fits`.

    Raises:
        ValueError: a path without ``config.json``, a model type outside the registry (unless
            ``space`` names ``layers_path`` and ``sites``), targets that match nothing, a budget
            above the supernet, or a bad option.
    """
    space = space if space is not None else default_search_space()
    if dtype not in DTYPES:
        raise ValueError(f"plan: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"plan: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("num_labels", num_labels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan: {name} must be an integer >= 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"plan: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise ValueError(f"plan: gpu_memory_gib must be > 0, got {gpu_memory_gib!r}")

    config = load_config(model_or_config)
    arch = _resolve_arch(config.model_type, space)  # a clear error for an unregistered model type
    model = build_meta_model(config, task, num_labels)
    base_params = base_param_count(model)
    weights = _base_weight_term(model, load_in_4bit, dtype)
    structure = _Structure.of(model, arch, space)  # read before attach wraps the linears
    handle = attach(model, space)
    bank = handle.bank
    structure.first_kept = min(c.layer for c in bank.specs)

    slices = _slices(handle.space, bank)
    supernet = bank.num_params()
    if budget is None:
        try:
            budget_n = default_budget(handle.space)
        except ValueError:
            raise ValueError(
                f"plan: {config.model_type} has no separate q/v projections for the default budget; "
                "give one (budget=..., --budget)"
            ) from None
        source = "default: peft LoRA r=8 on q, v"
    else:
        budget_n = resolve_budget(budget, base_params)
        source = f"given: {budget}"
    if budget_n > supernet:
        raise ValueError(
            f"plan: budget {budget_n:,} is above the supernet's {supernet:,} trainable parameters; "
            "enlarge the space or lower the budget"
        )
    targets = round_targets(supernet, budget_n, rounds, schedule)

    act_b = _bytes(dtype)
    bank_dtype = space.dtype
    head_params = sum(p.numel() for p in handle.head_parameters())
    memory = [weights, *_state_terms(supernet, bank_dtype, head_params, dtype)]
    memory += _activation_terms(
        structure, bank, task, act_b, bank_dtype, dtype, batch_size, max_length, backend
    )
    memory.append(
        MemoryTerm("CUDA context, workspaces", RUNTIME_ALLOWANCE, "fixed allowance (rough)", "runtime")
    )
    phases = _phases(memory, supernet, targets)

    notes = [
        f"activations: every batch {batch_size} x {max_length} tokens with a padding mask; "
        f"{structure.attn_impl} attention; layers {structure.first_kept}-{structure.num_layers - 1} keep "
        "activations (the first holding candidates and above)",
        "the candidates' units shrink with the bank; their input copies are counted as if every site kept a "
        "candidate (an upper bound once whole sites are pruned)",
        "not counted: dropout masks, transient buffers inside one op, allocator fragmentation",
    ]
    if load_in_4bit:
        notes.append(
            f"4-bit: NF4 (0.5 B/weight) with double quantisation: absmax per {NF4_BLOCK} weights in 8 bit, "
            f"a fp32 absmax per {NF4_DQ_BLOCK} of those, a fp32 offset per tensor; "
            f"{', '.join(QUANT_SKIP)}, embeddings, norms and biases stay {dtype}"
        )
    if bank_dtype != dtype:
        notes.append(
            f"the candidates run in {bank_dtype} on {dtype} activations: the tensor they read is kept as a "
            f"{bank_dtype} copy"
        )
    return Plan(
        model_type=config.model_type,
        task=task,
        num_layers=handle.space.num_layers,
        hidden_size=structure.hidden_size,
        vocab_size=structure.vocab_size,
        space=handle.space.describe(),
        base_params=base_params,
        base_precision=f"nf4 + {dtype}" if load_in_4bit else dtype,
        activation_dtype=dtype,
        bank_dtype=bank_dtype,
        num_candidates=bank.num_candidates,
        supernet_params=supernet,
        head_params=head_params,
        by_kind=slices[0],
        by_partition=slices[1],
        by_role=slices[2],
        budget=budget_n,
        budget_source=source,
        rounds=rounds,
        schedule=schedule,
        targets=targets,
        batch_size=batch_size,
        max_length=max_length,
        backend=backend,
        memory=memory,
        phases=phases,
        gpu_memory_bytes=None if gpu_memory_gib is None else int(gpu_memory_gib * GIB),
        notes=notes,
    )


def _bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def _slices(
    space: SearchSpace, bank: ModuleBank
) -> tuple[list[SpaceSlice], list[SpaceSlice], list[SpaceSlice]]:
    """The candidates broken down by kind, by depth partition and by site role."""
    params = [bank.candidate_params(c) for c in range(bank.num_candidates)]

    def make(name: str, members: list[int], detail: str = "") -> SpaceSlice:
        by_kind = {k: sum(params[c] for c in members if bank.specs[c].kind == k) for k in KINDS}
        return SpaceSlice(name, len(members), sum(params[c] for c in members), by_kind, detail)

    ids = range(bank.num_candidates)
    by_kind = [make(k, [c for c in ids if bank.specs[c].kind == k]) for k in KINDS]
    bounds = (0.0, *space.config.depth_partitions, 1.0)
    by_partition = []
    for p in range(len(bounds) - 1):
        layers = [i for i in range(space.num_layers) if space.partition_of_layer(i) == p]
        detail = "no layers" if not layers else f"layers {layers[0]}-{layers[-1]}"
        detail = f"layer {layers[0]}" if len(layers) == 1 else detail
        members = [c for c in ids if space.partition_of_layer(bank.specs[c].layer) == p]
        by_partition.append(make(f"{bounds[p] * 100:g}-{bounds[p + 1] * 100:g}%", members, detail))
    roles = list(dict.fromkeys(s.role for s in space.sites))
    by_role = [make(r, [c for c in ids if bank.specs[c].role == r]) for r in roles]
    return by_kind, by_partition, [s for s in by_role if s.candidates]


# ---------------------------------------------------------------------------------------- weights and state
def _base_weight_term(model: nn.Module, load_in_4bit: bool, dtype: str) -> MemoryTerm:
    b = _bytes(dtype)
    n = base_param_count(model)
    if not load_in_4bit:
        return MemoryTerm("base weights", n * b, f"{n:,} parameters x {b} B ({dtype})", "weights")
    quantized, n_q, q_bytes = 0, 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in QUANT_SKIP:
            w = mod.weight.numel()
            blocks = -(-w // NF4_BLOCK)
            q_bytes += -(-w // 2) + blocks + 4 * -(-blocks // NF4_DQ_BLOCK) + 4
            quantized, n_q = quantized + 1, n_q + w
    rest = n - n_q
    per_weight = q_bytes / max(1, n_q)
    formula = (
        f"{n_q:,} weights of {quantized} linears in NF4: 0.5 B + 1 B absmax per {NF4_BLOCK} "
        f"+ 4 B per {NF4_BLOCK * NF4_DQ_BLOCK} (double quant) = {per_weight:.4f} B/weight; "
        f"{rest:,} other parameters x {b} B ({dtype})"
    )
    return MemoryTerm("base weights", q_bytes + rest * b, formula, "weights")


def _state_terms(supernet: int, bank_dtype: str, head_params: int, dtype: str) -> list[MemoryTerm]:
    bb = _bytes(bank_dtype)
    terms = [
        MemoryTerm(
            "bank: masters, grads, AdamW",
            supernet * 4 * bb,
            f"{supernet:,} x ({bb} master + {bb} grad + {2 * bb} AdamW exp_avg, exp_avg_sq) B ({bank_dtype})",
            "optimizer",
            shrinks=True,
        ),
        MemoryTerm(
            "bank: AdaLoRA statistics",
            supernet * 8,
            f"{supernet:,} x 2 x 4 B (sensitivity, uncertainty in float32; kept by every search)",
            "optimizer",
            shrinks=True,
        ),
    ]
    if head_params:
        hb = _bytes(dtype)
        terms.append(
            MemoryTerm(
                "head: grads, AdamW",
                head_params * 3 * hb,
                f"{head_params:,} x ({hb} grad + {2 * hb} AdamW) B ({dtype}; its weights are in the base)",
                "optimizer",
            )
        )
    return terms


# ---------------------------------------------------------------------------------------- activations
@dataclass
class _Structure:
    """What the activation estimate reads off the meta model (before the supernet is attached)."""

    num_layers: int
    first_kept: int  # the first layer holding candidates: activations are kept from there up (set on attach)
    layer_sites: list[dict[str, tuple[int, int]]]  # per layer: role -> (in, out)
    layer_norms: list[list[tuple[int, bool]]]  # per layer: (features, is nn.LayerNorm)
    final_norms: list[tuple[int, bool]]
    hidden_size: int
    vocab_size: int
    heads: int
    attn_impl: str

    @classmethod
    def of(cls, model: nn.Module, arch, space: SpaceConfig) -> _Structure:
        full = SearchSpace.from_model(model, replace(space, layers=None))  # every layer's sites
        layer_mods = _find_layers(model, arch.layers, full.model_type)
        sites: list[dict[str, tuple[int, int]]] = [{} for _ in layer_mods]
        for s in full.sites:
            sites[s.layer].setdefault(s.role, (s.in_dim, s.out_dim))
        inside = {name for name, _ in layer_mods}
        norms = [[n for _, m in layer.named_modules() if (n := _norm(m))] for _, layer in layer_mods]
        final = [
            n
            for name, m in model.named_modules()
            if (n := _norm(m))
            and "embed" not in name
            and not any(name == p or name.startswith(p + ".") for p in inside)
        ]
        cfg = model.config
        hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model", "dim"))
        return cls(
            num_layers=len(layer_mods),
            first_kept=0,
            layer_sites=sites,
            layer_norms=norms,
            final_norms=final,
            hidden_size=hidden,
            vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
            heads=_first_attr(cfg, ("num_attention_heads", "n_head", "num_heads", "n_heads")),
            attn_impl=str(getattr(cfg, "_attn_implementation", None) or "eager"),
        )


def _first_attr(cfg, names: Sequence[str]) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"plan: the {cfg.model_type} config has none of {', '.join(names)}")


def _norm(mod: nn.Module) -> tuple[int, bool] | None:
    """``(features, is nn.LayerNorm)`` of a normalisation module, else None."""
    if isinstance(mod, nn.LayerNorm):
        return int(torch.Size(mod.normalized_shape).numel()), True
    w = getattr(mod, "weight", None)
    if "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor):
        return int(w.numel()), False
    return None


def _norm_bytes(norms: list[tuple[int, bool]], act_b: int) -> tuple[int, str]:
    total = sum(f * act_b + 8 if ln else f * 4 + 4 for f, ln in norms)
    parts = [f"({f} x {act_b} + 8)" if ln else f"({f} x 4 + 4)" for f, ln in norms]
    kinds = "LayerNorm input + mean, rstd" if all(ln for _, ln in norms) else "input in fp32 + rsqrt"
    if len(set(parts)) == 1:
        times = f"{len(parts)} x " if len(parts) > 1 else ""
        return total, f"{times}{parts[0]} B ({kinds})"
    return total, " + ".join(parts) + f" B ({kinds})"


def _layer_bytes(sites: dict[str, tuple[int, int]], norms, s: _Structure, act_b: int, length: int) -> list:
    """Per token, what one frozen layer keeps for backward: ``[(label, bytes, formula)]``."""
    out = []
    attn_elems, blocks, parts = 0, 0, []
    for q, qkv, o in _ATTN_ROLES:
        if qkv is not None and qkv in sites:
            attn_elems += sites[qkv][1]
            parts.append(f"qkv {sites[qkv][1]}")
        elif q in sites:  # k, v repeated to the query heads (GQA with a padding mask)
            attn_elems += 3 * sites[q][1]
            parts.append(f"3 x {sites[q][1]}")
        else:
            continue
        blocks += 1
        if o in sites:
            attn_elems += sites[o][0]
            parts.append(f"out {sites[o][0]}")
    if blocks:
        times = f"{blocks} x " if blocks > 1 else ""
        out.append(("attention q, k, v, out", attn_elems * act_b, f"({' + '.join(parts)}) x {act_b} B"))
        if s.attn_impl == "eager":
            per = s.heads * length * (4 + act_b)
            out.append(("attention probabilities", blocks * per,
                        f"{times}{s.heads} heads x {length} x (4 + {act_b}) B (eager)"))  # fmt: skip
        else:
            per = s.heads * 4 + length * act_b
            out.append(("attention lse, mask", blocks * per,
                        f"{times}({s.heads} heads x 4 B + {length} x {act_b} B mask row)"))  # fmt: skip
    if "down" in sites:
        f = sites["down"][0]
        gated = "gate" in sites
        n = 3 if gated else 1
        what = "gate, act(gate), up outputs" if gated else "activation input"
        out.append(("FFN", n * f * act_b, f"{n} x {f} x {act_b} B ({what})"))
    if norms:
        total, formula = _norm_bytes(norms, act_b)
        out.append(("norms", total, formula))
    return out


def _activation_terms(
    s: _Structure,
    bank: ModuleBank,
    task: str,
    act_b: int,
    bank_dtype: str,
    dtype: str,
    batch: int,
    length: int,
    backend: str,
) -> list[MemoryTerm]:
    tokens = batch * length
    tok = f"{batch} x {length} tokens"
    terms: list[MemoryTerm] = []
    kept = range(s.first_kept, s.num_layers)
    per_layer = [_layer_bytes(s.layer_sites[i], s.layer_norms[i], s, act_b, length) for i in kept]
    same = all(pl == per_layer[0] for pl in per_layer)
    labels = list(dict.fromkeys(label for pl in per_layer for label, _, _ in pl))
    for label in labels:
        per_token = sum(b for pl in per_layer for lab, b, _ in pl if lab == label)
        if same:
            formula = next(f for lab, _, f in per_layer[0] if lab == label)
            formula = f"{tok} x {len(kept)} layers x {formula}"
        else:
            formula = f"{tok} x {per_token:,} B per token summed over {len(kept)} layers"
        terms.append(MemoryTerm(f"activations: {label}", tokens * per_token, formula, "activations"))

    # candidates: the tensors they read (in the bank's dtype), then their units
    bb = _bytes(bank_dtype)
    cast = bank_dtype != dtype
    taps: dict[tuple, int] = {}
    for spec in bank.specs:
        if spec.kind == "serial_adapter":
            taps[("out", spec.site)] = spec.out_dim
        elif not cast:
            taps[("in", spec.group)] = spec.in_dim  # no cast: the candidates share the input tensor
        elif bank.input_group(spec.site) is not None:  # training groups sites sharing an input (any backend)
            taps[("group", bank.input_group(spec.site))] = spec.in_dim
        else:
            taps[("site", spec.site)] = spec.in_dim
    tap_elems = sum(taps.values())
    how = "one per layout group or lone site"
    terms.append(
        MemoryTerm(
            "activations: candidate inputs",
            tokens * tap_elems * bb,
            f"{tok} x {tap_elems:,} elements x {bb} B ({len(taps)} tensors read by candidates"
            + (f", {bank_dtype} copies, {how})" if cast else ")"),
            "activations",
        )
    )
    widths = bank.widths()
    if backend == "triton":
        units = sum(widths) * 4
        formula = f"{tok} x {sum(widths):,} units x 4 B (z in fp32)"
    else:
        lora = sum(w for w, sp in zip(widths, bank.specs, strict=True) if sp.kind == "lora")
        adapter = sum(widths) - lora
        units = (lora + 2 * adapter) * bb
        formula = f"{tok} x ({lora:,} LoRA + 2 x {adapter:,} adapter units) x {bb} B"
    terms.append(
        MemoryTerm("activations: candidate units", tokens * units, formula, "activations", shrinks=True)
    )

    if s.final_norms:
        total, formula = _norm_bytes(s.final_norms, act_b)
        terms.append(
            MemoryTerm("activations: final norm", tokens * total, f"{tok} x {formula}", "activations")
        )
    if task == "causal_lm":
        per = s.vocab_size * (act_b + 8)
        formula = f"{tok} x {s.vocab_size:,} x ({act_b} logits + 4 fp32 log-softmax + 4 its grad) B"
        terms.append(MemoryTerm("activations: logits", tokens * per, formula, "activations"))
    else:
        formula = f"{tok} x {s.hidden_size} x {act_b} B (upper bound: encoders pool first)"
        terms.append(
            MemoryTerm("activations: head input", tokens * s.hidden_size * act_b, formula, "activations")
        )
    return terms


def _phases(memory: list[MemoryTerm], supernet: int, targets: list[int]) -> list[Phase]:
    """The estimate while each phase trains, and at the compaction that ends it."""
    trains = [supernet, *targets]
    names = ["warm-up + round 1", *(f"round {r}" for r in range(2, len(targets) + 1)), "final training"]
    nexts: list[int | None] = [*targets, None]

    def at(t: MemoryTerm, p: float) -> int:
        return int(round(t.bytes * p / supernet)) if t.shrinks else t.bytes

    out = []
    for name, p, nxt in zip(names, trains, nexts, strict=True):
        opt = sum(at(t, p) for t in memory if t.category == "optimizer")
        act = sum(at(t, p) for t in memory if t.category == "activations")
        rest = sum(t.bytes for t in memory if t.category in ("weights", "runtime"))
        compaction = 0
        if nxt is not None:
            compaction = rest + sum(at(t, p + nxt) for t in memory if t.category == "optimizer")
        out.append(Phase(name, p, opt, act, rest + opt + act, compaction))
    return out


# ---------------------------------------------------------------------------------------- output
def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> str:
    """Plain-text table; ``align`` gives each column's alignment (``l``/``r``), columns past it align right."""
    cols = list(zip(headers, *rows, strict=True))
    widths = [max(len(str(x)) for x in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if align[i : i + 1] == "l" else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _slice_rows(slices: list[SpaceSlice], base: int, detail: bool = False) -> list[list[str]]:
    rows = []
    for s in slices:
        row = [s.name] + ([s.detail] if detail else [])
        row += [f"{s.candidates:,}"] + [f"{s.params_by_kind[k]:,}" for k in KINDS]
        rows.append(row + [f"{s.params:,}", f"{100 * s.params / base:.3f}%"])
    return rows


def format_plan(plan: Plan) -> str:
    """The plan as readable tables (what ``prunepeft plan`` prints)."""
    out = [
        f"prunepeft plan: {plan.model_type} ({plan.task}), {plan.num_layers} layers, hidden {plan.hidden_size}, "
        f"vocab {plan.vocab_size:,}, {plan.base_params:,} base parameters",
        f"supernet: {plan.space}",
        "",
    ]
    kinds_h = list(KINDS)
    total = SpaceSlice("total", plan.num_candidates, plan.supernet_params,
                       {k: sum(s.params_by_kind[k] for s in plan.by_kind) for k in KINDS})  # fmt: skip
    out.append("Candidates by kind")
    kind_rows = [
        [s.name, f"{s.candidates:,}", f"{s.params:,}", f"{100 * s.params / plan.base_params:.3f}%"]
        for s in [*plan.by_kind, total]
    ]
    out.append(_table(["kind", "candidates", "parameters", "% of base"], kind_rows))
    if plan.head_params:
        out.append(f"(+ {plan.head_params:,} head parameters train too)")
    out += ["", "Candidates by depth partition (parameters per kind)"]
    out.append(_table(["partition", "layers", "candidates", *kinds_h, "total", "% of base"],
                      _slice_rows(plan.by_partition, plan.base_params, detail=True), align="ll"))  # fmt: skip
    out += ["", "Candidates by site role (parameters per kind)"]
    out.append(_table(["role", "candidates", *kinds_h, "total", "% of base"],
                      _slice_rows(plan.by_role, plan.base_params)))  # fmt: skip
    targets = " -> ".join(f"{t:,}" for t in plan.targets)
    out += [
        "",
        f"Budget: {plan.budget:,} parameters = {plan.budget_percent:.4f}% of the base ({plan.budget_source}); "
        f"the supernet is {plan.supernet_params / plan.budget:.2f}x the budget",
        f"Rounds: {plan.rounds}, {plan.schedule}: {plan.supernet_params:,} -> {targets}",
        "",
        f"Memory estimate, supernet at full size (base {plan.base_precision}, activations {plan.activation_dtype}, "
        f"bank {plan.bank_dtype}, batch {plan.batch_size} x {plan.max_length}, {plan.backend} kernels)",
    ]
    rows = [[t.name, _gib(t.bytes), t.formula] for t in plan.memory]
    rows.append(["total", _gib(sum(t.bytes for t in plan.memory)), ""])
    out.append(_table(["term", "GiB", "how"], rows, align="lrl"))
    out += ["", "Per phase, as the bank shrinks (GiB)"]
    rows = [
        [p.name, f"{p.trainable_params:,}", _gib(p.optimizer_bytes), _gib(p.activation_bytes), _gib(p.total_bytes),
         _gib(p.compaction_bytes) if p.compaction_bytes else "-"]
        for p in plan.phases
    ]  # fmt: skip
    out.append(_table(["phase", "trains", "bank+head state", "activations", "total", "compaction"], rows))
    verdict = f"Peak: {_gib(plan.peak_bytes)} GiB"
    if plan.fits is not None:
        gpu = _gib(plan.gpu_memory_bytes)
        verdict += f": fits in {gpu} GiB" if plan.fits else f": does NOT fit in {gpu} GiB"
    out += ["", verdict, "", "Assumptions:", *(f"- {n}" for n in plan.notes)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "plan",
        help="will a search fit? candidates, parameters, budget and a GPU memory estimate from config.json alone",
        description="Plan a search before loading any weights: the supernet is attached to the model built "
        "on the meta device from its config.json; prints candidates and parameters per kind, depth "
        "partition and site role, the budget, and a memory estimate per phase with its formulas.",
    )
    p.add_argument("--model", required=True, help="a model directory with config.json, or a config.json path")
    p.add_argument("--task", default="causal_lm", choices=list(TASKS))
    p.add_argument("--num-labels", type=int, default=2, help="labels of the classification head")
    d = default_search_space()  # what 'prunepeft search' attaches when no space flag is given
    g = p.add_argument_group("search space (defaults: prunepeft search's)")
    g.add_argument("--lora-targets", nargs="*", default=list(d.lora_targets),
                   help=f"roles or module names (default: {' '.join(d.lora_targets)})")  # fmt: skip
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"(default: {d.lora_rank})")
    g.add_argument("--serial-adapters", nargs="*", default=list(d.serial_adapter_targets),
                   help=f"attn and/or ffn (default: {' '.join(d.serial_adapter_targets)})")  # fmt: skip
    g.add_argument("--parallel-adapters", nargs="*", default=list(d.parallel_adapter_targets),
                   help="sites for parallel adapters (e.g. up; default: none)")  # fmt: skip
    g.add_argument("--adapter-width", type=int, default=d.adapter_width, help=f"(default: {d.adapter_width})")
    g.add_argument("--block-size", type=int, default=d.block_size, help=f"(default: {d.block_size})")
    g = p.add_argument_group("search")
    g.add_argument("--budget", help="an integer, a percentage of the base ('0.5%%') or a fraction; "
                   "default: the size of LoRA r=8 on q, v")  # fmt: skip
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--schedule", default="linear", choices=list(SCHEDULES))
    g = p.add_argument_group("memory")
    g.add_argument("--load-in-4bit", action="store_true", help="base linears in NF4 with double quantisation")
    g.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="dense base weights and activations (default: bfloat16)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--backend", default="triton", choices=list(BACKENDS),
                   help="the candidates' kernels: triton (GPU, default) or reference (pure torch)")  # fmt: skip
    g.add_argument(
        "--gpu-memory", type=float, metavar="GIB", help="the GPU's memory in GiB: say whether it fits"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``prunepeft plan`` with parsed ``args``; prints the plan and returns 0."""
    space = SpaceConfig(lora_targets=tuple(args.lora_targets), lora_rank=args.lora_rank,
                        serial_adapter_targets=tuple(args.serial_adapters),
                        parallel_adapter_targets=tuple(args.parallel_adapters),
                        adapter_width=args.adapter_width, block_size=args.block_size)  # fmt: skip
    plan = plan_model(args.model, space, load_in_4bit=args.load_in_4bit, dtype=args.dtype,
                      batch_size=args.batch_size, max_length=args.max_length, budget=args.budget,
                      rounds=args.rounds, schedule=args.schedule, task=args.task, num_labels=args.num_labels,
                      backend=args.backend, gpu_memory_gib=args.gpu_memory)  # fmt: skip
    print(format_plan(plan))
    return 0
