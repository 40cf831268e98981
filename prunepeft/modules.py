"""``BottleneckSite``: a linear layer plus every candidate PEFT module attached to it (DESIGN §2).

A site wraps one ``nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or GPT-2 ``Conv1D`` (anything that maps
``[..., in] -> [..., out]``) and evaluates the candidates stored for it in a :class:`ModuleBank`:

- input-tap candidates (``lora``, ``parallel_adapter``) read the site's input ``x``;
- output-tap candidates (``serial_adapter``) read ``y1 = base(x) + sum(input-tap outputs)``,
  the adapted linear's output, and add their output to it.

The base computation stays the wrapped module's own (bitsandbytes' NF4 kernels for a 4-bit base);
the candidates run in the bank's dtype and are cast back to the base output's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import ModuleBank
from .ops import bottleneck


class BottleneckSite(nn.Module):
    """Wraps ``base`` and adds the bank's candidates registered under ``site_name``."""

    def __init__(self, base: nn.Module, site_name: str, bank: ModuleBank) -> None:
        super().__init__()
        self.base = base
        self.site_name = site_name
        # not registered as a submodule: the bank is owned by the model / handle, shared by all sites
        self.__dict__["bank"] = bank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        bank: ModuleBank = self.__dict__["bank"]
        for tap in ("input", "output"):
            slab = bank.slab(self.site_name, tap)
            if slab is None:
                continue
            d, ut, pieces, scale = slab
            inp = x if tap == "input" else y
            act = bank.activation_buffer(self.site_name, tap, inp.numel() // inp.shape[-1])
            y = y + bottleneck(inp.to(d.dtype), d, ut, pieces, scale, act).to(y.dtype)
        return y

    def __getattr__(self, name: str):
        # behave like the wrapped layer for code that reads e.g. `.weight`, `.in_features`, `.nf`
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:  # during construction / unpickling
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"
