"""The search space: which candidate PEFT modules go where, for each supported architecture (ARCHITECTURE.md §5).

An explicit registry maps ``config.model_type`` to where the transformer layers are and, inside a
layer, where each linear sits under a canonical *role*:

============  ==========================================================================
role          meaning
============  ==========================================================================
``q k v o``   attention query / key / value / output projections (``qkv``: GPT-2's fused)
``gate up``   FFN input projections (``gate`` only in gated FFNs)
``down``      FFN output projection
``cross_*``   T5 decoder cross-attention projections
============  ==========================================================================

Targets in :class:`SpaceConfig` may name roles, the aliases ``attn`` (= ``o``, "after attention")
and ``ffn`` (= ``down``, "after the FFN"), ``all`` (every role), or the architecture's own module
names (``query``, ``q_proj``, ``c_attn``; ``dense`` in BERT means every ``dense``, as in peft).
Models outside the registry are named explicitly with ``SpaceConfig(layers_path=..., sites=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .bank import CandidateSpec
from .ops import ACTIVATIONS


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its layers and linears.

    Attributes:
        layers: dotted suffixes of the ``nn.ModuleList``s holding the layers, in depth order.
        roles: canonical role -> paths inside one layer; the first path that exists is used (so one
            spec serves T5's encoder and decoder blocks).
    """

    layers: tuple[str, ...]
    roles: dict[str, tuple[str, ...]]


_BERT_LIKE = {
    "q": ("attention.self.query",),
    "k": ("attention.self.key",),
    "v": ("attention.self.value",),
    "o": ("attention.output.dense",),
    "up": ("intermediate.dense",),
    "down": ("output.dense",),
}
_LLAMA_LIKE = ArchSpec(
    layers=("layers",),
    roles={
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.o_proj",),
        "gate": ("mlp.gate_proj",),
        "up": ("mlp.up_proj",),
        "down": ("mlp.down_proj",),
    },
)
_T5 = ArchSpec(
    layers=("encoder.block", "decoder.block"),
    roles={
        "q": ("layer.0.SelfAttention.q",),
        "k": ("layer.0.SelfAttention.k",),
        "v": ("layer.0.SelfAttention.v",),
        "o": ("layer.0.SelfAttention.o",),
        "cross_q": ("layer.1.EncDecAttention.q",),
        "cross_k": ("layer.1.EncDecAttention.k",),
        "cross_v": ("layer.1.EncDecAttention.v",),
        "cross_o": ("layer.1.EncDecAttention.o",),
        "gate": ("layer.1.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_0"),
        "up": (
            "layer.1.DenseReluDense.wi",
            "layer.2.DenseReluDense.wi",
            "layer.1.DenseReluDense.wi_1",
            "layer.2.DenseReluDense.wi_1",
        ),
        "down": ("layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
    },
)

#: ``config.model_type`` -> :class:`ArchSpec`.
ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec(layers=("encoder.layer",), roles=_BERT_LIKE),
    "roberta": ArchSpec(layers=("encoder.layer",), roles=_BERT_LIKE),
    "deberta-v2": ArchSpec(
        layers=("encoder.layer",),
        roles={
            **_BERT_LIKE,
            "q": ("attention.self.query_proj",),
            "k": ("attention.self.key_proj",),
            "v": ("attention.self.value_proj",),
        },
    ),
    "distilbert": ArchSpec(
        layers=("transformer.layer",),
        roles={
            "q": ("attention.q_lin",),
            "k": ("attention.k_lin",),
            "v": ("attention.v_lin",),
            "o": ("attention.out_lin",),
            "up": ("ffn.lin1",),
            "down": ("ffn.lin2",),
        },
    ),
    "gpt2": ArchSpec(
        layers=("h",),
        roles={"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "up": ("mlp.c_fc",), "down": ("mlp.c_proj",)},
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "t5": _T5,
    "mt5": _T5,
}

#: Roles that read the same input tensor share a layout group (one GEMM can serve them).
_INPUT_OF_ROLE = {
    "q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in",
    "gate": "ffn_in", "up": "ffn_in",
    "cross_k": "cross_kv_in", "cross_v": "cross_kv_in",
}  # fmt: skip
_ROLE_ALIASES = {"attn": ("o",), "ffn": ("down",)}


@dataclass
class SpaceConfig:
    """What candidates the supernet holds.

    Attributes:
        lora_targets: sites that get a LoRA candidate (roles, aliases or module names; see module doc).
        lora_rank: LoRA rank of every LoRA candidate before pruning (>= 1).
        lora_alpha: LoRA alpha; scaling is ``alpha / rank``. Default: ``2 * lora_rank``.
        serial_adapter_targets: sites after which a serial (Houlsby) adapter is added; ``ffn`` =
            after the FFN (the paper's default), ``attn`` = after attention.
        parallel_adapter_targets: sites that get a parallel adapter (reads the site's input).
        adapter_width: bottleneck width of every adapter before pruning (>= 1).
        adapter_activation: adapters' activation, one of relu, gelu, silu, identity.
        block_size: units per prunable block; must divide ``lora_rank`` and ``adapter_width``.
        layers: depth indices that get candidates (default: all).
        depth_partitions: boundaries, as fractions of depth, of the depth partitions that make the
            hybrid strategy's regions; default 20/50/80% (four partitions).
        trainable_modules: modules (by name suffix) left trainable besides the candidates, e.g. a
            classification head. ``None``: ``classifier`` and ``score`` where present.
        layers_path: for models outside the registry, the dotted path(s) of the layers' ModuleList.
        sites: for models outside the registry (or to override it), role -> path inside one layer.
        dtype: dtype of the candidates' parameters (``float32`` keeps fp32 masters under a 4-bit base).
        seed: seed for initialising the candidates.
    """

    lora_targets: Sequence[str] = ("q", "v")
    lora_rank: int = 8
    lora_alpha: float | None = None
    serial_adapter_targets: Sequence[str] = ("ffn",)
    parallel_adapter_targets: Sequence[str] = ()
    adapter_width: int = 16
    adapter_activation: str = "relu"
    block_size: int = 4
    layers: Sequence[int] | None = None
    depth_partitions: Sequence[float] = (0.2, 0.5, 0.8)
    trainable_modules: Sequence[str] | None = None
    layers_path: str | Sequence[str] | None = None
    sites: dict[str, str] | None = None
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lora_targets", "serial_adapter_targets", "parallel_adapter_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            setattr(self, name, tuple(value))
        if not (self.lora_targets or self.serial_adapter_targets or self.parallel_adapter_targets):
            raise ValueError(
                "SpaceConfig: no targets: set lora_targets, serial_adapter_targets or parallel_adapter_targets"
            )
        for name in ("lora_rank", "adapter_width", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SpaceConfig.{name} must be an integer >= 1, got {value!r}")
        if self.lora_targets and self.lora_rank % self.block_size:
            raise ValueError(
                f"SpaceConfig: lora_rank {self.lora_rank} is not divisible by block_size {self.block_size}"
            )
        if (
            self.serial_adapter_targets or self.parallel_adapter_targets
        ) and self.adapter_width % self.block_size:
            raise ValueError(
                f"SpaceConfig: adapter_width {self.adapter_width} is not divisible by block_size {self.block_size}"
            )
        if self.adapter_activation not in ACTIVATIONS:
            raise ValueError(
                f"SpaceConfig.adapter_activation must be one of {', '.join(ACTIVATIONS)}, got {self.adapter_activation!r}"
            )
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.lora_alpha <= 0:
            raise ValueError(f"SpaceConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        parts = tuple(float(p) for p in self.depth_partitions)
        if any(not 0 < p < 1 for p in parts) or any(a >= b for a, b in zip(parts, parts[1:], strict=False)):
            raise ValueError(
                f"SpaceConfig.depth_partitions must be increasing fractions in (0, 1), got {self.depth_partitions!r}"
            )
        self.depth_partitions = parts
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"SpaceConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.sites is not None and not self.sites:
            raise ValueError("SpaceConfig.sites must name at least one role -> path")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Site:
    """One linear of the model that candidates can attach to."""

    name: str  # qualified module name
    role: str
    layer: int
    in_dim: int
    out_dim: int


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear-like module (``nn.Linear``, ``Linear4bit``, GPT-2 ``Conv1D``), else None."""
    if isinstance(module, nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return None


@dataclass
class SearchSpace:
    """The supernet's candidates for one model: sites, candidate specs and depth partitions."""

    model_type: str
    num_layers: int
    sites: list[Site]
    candidates: list[CandidateSpec]
    config: SpaceConfig
    roles: tuple[str, ...] = field(default=())

    @classmethod
    def from_model(cls, model: nn.Module, config: SpaceConfig | None = None) -> SearchSpace:
        """Enumerate the candidates of ``config`` on ``model`` (a transformers model or any module)."""
        config = config or SpaceConfig()
        if not any(linear_dims(m) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} has no Linear layers: prunepeft attaches PEFT modules to "
                "nn.Linear / bitsandbytes Linear4bit / Conv1D layers"
            )
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        arch = _resolve_arch(model_type, config)
        layer_mods = _find_layers(model, arch.layers, model_type)
        num_layers = len(layer_mods)
        wanted_layers = range(num_layers) if config.layers is None else config.layers
        for i in wanted_layers:
            if not 0 <= i < num_layers:
                raise ValueError(
                    f"SpaceConfig.layers: layer {i} out of range; the model has {num_layers} layers"
                )

        sites: list[Site] = []
        for depth in wanted_layers:
            prefix, layer = layer_mods[depth]
            for role, paths in arch.roles.items():
                for path in paths:
                    mod = _get_submodule(layer, path)
                    if mod is None:
                        continue
                    dims = linear_dims(mod)
                    if dims is None:
                        raise ValueError(
                            f"site {prefix}.{path} (role {role!r}) is a {type(mod).__name__}, not a Linear layer"
                        )
                    sites.append(Site(f"{prefix}.{path}", role, depth, dims[0], dims[1]))
                    break
        if not sites:
            raise ValueError(f"no sites found in {model_type} for roles {sorted(arch.roles)}")
        roles = tuple(dict.fromkeys(s.role for s in sites))
        leaf_names = _leaf_aliases(arch)

        def resolve(targets: Sequence[str], field_name: str) -> set[str]:
            out: set[str] = set()
            for t in targets:
                if t == "all":
                    out.update(roles)
                elif t in roles:
                    out.add(t)
                elif t in _ROLE_ALIASES and set(_ROLE_ALIASES[t]) & set(roles):
                    out.update(set(_ROLE_ALIASES[t]) & set(roles))
                elif t in leaf_names:
                    out.update(leaf_names[t])
                else:
                    known = sorted(
                        set(roles)
                        | {a for a, r in _ROLE_ALIASES.items() if set(r) & set(roles)}
                        | set(leaf_names)
                    )
                    raise ValueError(
                        f"SpaceConfig.{field_name}: unknown site {t!r} for {model_type}; known: {', '.join(known)}, all"
                    )
            return out

        lora_roles = resolve(config.lora_targets, "lora_targets")
        serial_roles = resolve(config.serial_adapter_targets, "serial_adapter_targets")
        parallel_roles = resolve(config.parallel_adapter_targets, "parallel_adapter_targets")

        cands: list[CandidateSpec] = []
        for s in sites:
            group_in = f"{s.layer}:{_INPUT_OF_ROLE.get(s.role, s.role + '_in')}"
            common = dict(site=s.name, role=s.role, layer=s.layer, block_size=config.block_size)
            if s.role in lora_roles:
                cands.append(
                    CandidateSpec(
                        name=f"{s.name}:lora", kind="lora", in_dim=s.in_dim, out_dim=s.out_dim,
                        width=config.lora_rank, activation="identity", bias=False,
                        scaling=float(config.lora_alpha) / config.lora_rank, group=group_in, **common,
                    )
                )  # fmt: skip
            if s.role in parallel_roles:
                cands.append(
                    CandidateSpec(
                        name=f"{s.name}:parallel_adapter", kind="parallel_adapter", in_dim=s.in_dim,
                        out_dim=s.out_dim, width=config.adapter_width, activation=config.adapter_activation,
                        bias=True, scaling=1.0, group=group_in, **common,
                    )
                )  # fmt: skip
            if s.role in serial_roles:
                cands.append(
                    CandidateSpec(
                        name=f"{s.name}:serial_adapter", kind="serial_adapter", in_dim=s.out_dim,
                        out_dim=s.out_dim, width=config.adapter_width, activation=config.adapter_activation,
                        bias=True, scaling=1.0, group=f"{s.name}:out", **common,
                    )
                )  # fmt: skip
        if not cands:
            raise ValueError(f"the space has no candidates on {model_type}: no target matched a site")
        # lay out groups contiguously: candidates of one input group together, sites in model order
        group_rank = {g: i for i, g in enumerate(dict.fromkeys(c.group for c in cands))}
        cands.sort(key=lambda c: group_rank[c.group])
        return cls(model_type, num_layers, sites, cands, config, roles)

    # ------------------------------------------------------------------ regions
    def partition_of_layer(self, layer: int) -> int:
        """Index of the depth partition holding ``layer`` (by the layer's centre)."""
        frac = (layer + 0.5) / self.num_layers
        return sum(frac >= b for b in self.config.depth_partitions)

    def region(self, cand: CandidateSpec) -> tuple[str, int]:
        """The hybrid strategy's region of a candidate: (kind, depth partition)."""
        return cand.kind, self.partition_of_layer(cand.layer)

    def supernet_params(self) -> int:
        """Trainable parameters of the full supernet (before any pruning)."""
        return sum(
            c.width * (c.in_dim + c.out_dim + (1 if c.bias else 0)) + (c.out_dim if c.bias else 0)
            for c in self.candidates
        )

    def describe(self) -> str:
        """A short human-readable summary."""
        kinds: dict[str, int] = {}
        for c in self.candidates:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"{self.model_type}: {self.num_layers} layers, {len(self.candidates)} candidates ({parts}), {self.supernet_params():,} parameters"


def _resolve_arch(model_type: str, config: SpaceConfig) -> ArchSpec:
    base = ARCHITECTURES.get(model_type)
    if config.sites is None and config.layers_path is None:
        if base is None:
            raise ValueError(
                f"model type {model_type!r} is not in prunepeft's architecture registry "
                f"(supported: {', '.join(sorted(ARCHITECTURES))}). Name its layers and sites explicitly, e.g. "
                "SpaceConfig(layers_path='encoder.layer', sites={'q': 'attention.self.query', "
                "'v': 'attention.self.value', 'down': 'output.dense'})"
            )
        return base
    if config.layers_path is None and base is None:
        raise ValueError(
            f"model type {model_type!r} is not registered: SpaceConfig.sites needs layers_path too"
        )
    if config.sites is None and base is None:
        raise ValueError(
            f"model type {model_type!r} is not registered: SpaceConfig.layers_path needs sites too"
        )
    layers = config.layers_path if config.layers_path is not None else base.layers
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    roles = {r: (p,) for r, p in config.sites.items()} if config.sites is not None else base.roles
    return ArchSpec(layers=layers, roles=roles)


def _find_layers(model: nn.Module, suffixes: tuple[str, ...], model_type: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for suffix in suffixes:
        found = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
        ]
        if not found:
            raise ValueError(
                f"{model_type}: no nn.ModuleList named '{suffix}' found (looked for the model's layers)"
            )
        if len(found) > 1:
            raise ValueError(f"{model_type}: several ModuleLists match '{suffix}': {[n for n, _ in found]}")
        name, mods = found[0]
        out.extend((f"{name}.{i}", m) for i, m in enumerate(mods))
    return out


def _get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _leaf_aliases(arch: ArchSpec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for role, paths in arch.roles.items():
        for p in paths:
            leaf = p.rsplit(".", 1)[-1]
            if role not in out.setdefault(leaf, []):
                out[leaf].append(role)
    return out
