"""BottleneckSite forward/backward against the dense formulas of ARCHITECTURE.md §2, written out here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunepeft import BottleneckSite, CandidateSpec, ModuleBank

IN, OUT = 24, 20


def _specs(bs=4, dtype_widths=(8, 12, 8)):
    wl, wp, ws = dtype_widths
    common = dict(site="lin", role="q", layer=0, block_size=bs)
    return [
        CandidateSpec("lin:lora", "lora", in_dim=IN, out_dim=OUT, width=wl, scaling=2.0, group="in", **common),
        CandidateSpec(
            "lin:parallel_adapter", "parallel_adapter", in_dim=IN, out_dim=OUT, width=wp,
            activation="gelu", bias=True, group="in", **common,
        ),
        CandidateSpec(
            "lin:serial_adapter", "serial_adapter", in_dim=OUT, out_dim=OUT, width=ws,
            activation="relu", bias=True, group="out", **common,
        ),
    ]  # fmt: skip


def _site(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT).to(dtype)
    bank = ModuleBank(_specs(), dtype=dtype)
    with torch.no_grad():  # non-zero up-projections so every term matters
        bank.flat.normal_(0, 0.3)
    return lin, bank, BottleneckSite(lin, "lin", bank)


def _dense(x, lin, bank, mask_units=None):
    """The three kinds written out: y1 = Wx + b + s·U(Dx) + U_p σ(D_p x + b_d) + b_u; y = y1 + serial(y1)."""
    t = [bank.candidate_tensors(i) for i in range(3)]
    cast = lambda v: v.to(x.dtype)  # noqa: E731
    m = mask_units or [None, None, None]

    def units(i, h):
        return h if m[i] is None else h * m[i].to(h.dtype)

    y0 = torch.einsum("...i,oi->...o", x, cast(lin.weight)) + cast(lin.bias)
    lora = 2.0 * torch.einsum(
        "...r,ro->...o", units(0, torch.einsum("...i,ri->...r", x, cast(t[0]["D"]))), cast(t[0]["Ut"])
    )
    hp = torch.nn.functional.gelu(torch.einsum("...i,ri->...r", x, cast(t[1]["D"])) + cast(t[1]["bd"]))
    par = torch.einsum("...r,ro->...o", units(1, hp), cast(t[1]["Ut"])) + cast(t[1]["bu"])
    y1 = y0 + lora + par
    hs = torch.relu(torch.einsum("...i,ri->...r", y1, cast(t[2]["D"])) + cast(t[2]["bd"]))
    return y1 + torch.einsum("...r,ro->...o", units(2, hs), cast(t[2]["Ut"])) + cast(t[2]["bu"])


@pytest.mark.parametrize("shape", [(5, IN), (2, 7, IN), (1, 1, IN)])
def test_forward_backward_fp32(shape):
    lin, bank, site = _site()
    x = torch.randn(*shape, requires_grad=True)
    y = site(x)
    x64 = x.detach().double().requires_grad_(True)
    flat64 = bank.flat.detach().double().clone().requires_grad_(True)
    bank64 = ModuleBank(_specs(), dtype=torch.float64)
    bank64.flat = nn.Parameter(flat64)
    bank64._rebuild()
    ref = _dense(x64, lin.double(), bank64)
    lin.float()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank.flat.grad.double(), bank64.flat.grad, rtol=1e-4, atol=1e-5)


def test_bf16_error_within_twice_torch_bf16():
    """bf16 site vs fp64 formula: at most 2x the error of the same formula computed in bf16."""
    lin, bank, site = _site(dtype=torch.bfloat16)
    x = torch.randn(4, 6, IN, dtype=torch.bfloat16)
    y = site(x).double()
    bank64 = ModuleBank(_specs(), dtype=torch.float64)
    with torch.no_grad():
        bank64.flat.copy_(bank.flat.double())
    ref64 = _dense(x.double(), _lin64(lin), bank64)
    ref_bf16 = _dense(x, lin, bank).double()
    err_site = (y - ref64).abs().max().item()
    err_torch = (ref_bf16 - ref64).abs().max().item()
    assert err_site <= 2 * err_torch + 1e-3, (err_site, err_torch)


def _lin64(lin):
    out = nn.Linear(IN, OUT).double()
    out.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    return out


def test_attach_is_identity_at_init():
    lin = nn.Linear(IN, OUT)
    bank = ModuleBank(_specs())
    site = BottleneckSite(lin, "lin", bank)
    x = torch.randn(3, IN)
    torch.testing.assert_close(site(x), lin(x), rtol=0, atol=0)


def test_masking_a_block_equals_removing_it():
    lin, bank, site = _site()
    x = torch.randn(3, 5, IN)
    # mask block 1 of the LoRA (units 4..7), block 0 of the parallel adapter, block 1 of the serial one
    lora_blocks = list(bank.candidate_blocks(0))
    par_blocks = list(bank.candidate_blocks(1))
    ser_blocks = list(bank.candidate_blocks(2))
    bank.mask_blocks([lora_blocks[1], par_blocks[0], ser_blocks[1]])
    m = [torch.ones(8), torch.ones(12), torch.ones(8)]
    m[0][4:8] = 0
    m[1][0:4] = 0
    m[2][4:8] = 0
    torch.testing.assert_close(site(x), _dense(x, lin, bank, m), rtol=1e-5, atol=1e-5)
    # masked parameters get no gradient
    site(x).sum().backward()
    d_lora = bank.candidate_tensors(0)["D"]
    off = d_lora.storage_offset()
    assert bank.flat.grad[off + 4 * IN : off + 8 * IN].abs().sum() == 0
    assert bank.num_params() == bank.num_params(effective=False) - 3 * 0 - (
        bank.block_cost(0) + bank.block_cost(1) + bank.block_cost(2)
    )


def test_fully_masked_candidate_drops_its_output_bias():
    lin, bank, site = _site()
    x = torch.randn(2, IN)
    bank.mask_candidates([1, 2])
    lora_only = nn.Linear(IN, OUT)
    lora_only.load_state_dict(lin.state_dict())
    t = bank.candidate_tensors(0)
    expect = lin(x) + 2.0 * (x @ t["D"].t()) @ t["Ut"]
    torch.testing.assert_close(site(x), expect, rtol=1e-5, atol=1e-5)
    assert bank.num_params() == bank.candidate_params(0)


def test_width_not_divisible_by_block_size():
    with pytest.raises(ValueError, match="not divisible by block_size"):
        CandidateSpec(
            "x:lora", "lora", site="x", role="q", layer=0, in_dim=4, out_dim=4, width=6, block_size=4
        )


def test_unknown_kind_and_activation():
    with pytest.raises(ValueError, match="kind must be one of"):
        CandidateSpec(
            "x:k", "prefix", site="x", role="q", layer=0, in_dim=4, out_dim=4, width=4, block_size=4
        )
    with pytest.raises(ValueError, match="activation"):
        CandidateSpec(
            "x:k",
            "lora",
            site="x",
            role="q",
            layer=0,
            in_dim=4,
            out_dim=4,
            width=4,
            block_size=4,
            activation="tanh",
        )


def test_site_behaves_like_the_wrapped_linear():
    lin, bank, site = _site()
    assert site.in_features == IN and site.out_features == OUT and site.weight is lin.weight
    with pytest.raises(AttributeError):
        _ = site.no_such_attribute


def test_activation_statistics_per_block():
    lin, bank, site = _site()
    x = torch.randn(3, 5, IN)
    assert site(x) is not None and bank.act_sum is None  # off by default
    bank.collect_activations = True
    site(x)
    site(x[:1])
    means = bank.activation_means()
    t = [bank.candidate_tensors(i) for i in range(3)]
    h_lora = x @ t[0]["D"].t()
    h_par = torch.nn.functional.gelu(x @ t[1]["D"].t() + t[1]["bd"])
    y1 = lin(x) + 2.0 * h_lora @ t[0]["Ut"] + h_par @ t[1]["Ut"] + t[1]["bu"]
    h_ser = torch.relu(y1 @ t[2]["D"].t() + t[2]["bd"])
    x1 = x[:1]
    h_lora1 = x1 @ t[0]["D"].t()
    h_par1 = torch.nn.functional.gelu(x1 @ t[1]["D"].t() + t[1]["bd"])
    y11 = lin(x1) + 2.0 * h_lora1 @ t[0]["Ut"] + h_par1 @ t[1]["Ut"] + t[1]["bu"]
    h_ser1 = torch.relu(y11 @ t[2]["D"].t() + t[2]["bd"])

    def per_block(h, h1):
        a = torch.cat([h.abs().reshape(-1, h.shape[-1]), h1.abs().reshape(-1, h1.shape[-1])])
        return a.mean(0).view(-1, 4).mean(1)

    expect = torch.cat([per_block(h_lora, h_lora1), per_block(h_par, h_par1), per_block(h_ser, h_ser1)])
    torch.testing.assert_close(means.float(), expect.detach(), rtol=1e-5, atol=1e-6)
