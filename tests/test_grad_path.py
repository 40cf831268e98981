"""The bank's gradient path (issue 12): slab views whose gradients land in one ``flat.grad`` buffer
per backward pass, and the grouped down-projection of the reference path.

The oracle for the gradients is the old path, kept here: every slab a plain ``flat.narrow`` view
(autograd then makes one full-size zero tensor per view and sums them into ``flat.grad``).
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import group_specs, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import prunepeft.modules as modules_mod
from prunepeft import SpaceConfig, attach
from prunepeft.bank import ModuleBank
from prunepeft.modules import BottleneckSite
from prunepeft.ops import FlatGrad, _Sink, bottleneck_reference, bottleneck_stacked

# LoRA on q, k, v, o; a gelu parallel adapter on q (so q's group piece has biases and an
# activation); serial adapters after attention and the FFN
SPACE = SpaceConfig(
    lora_targets=("q", "k", "v", "o"), parallel_adapter_targets=("q",), serial_adapter_targets=("attn", "ffn"),
    lora_rank=8, adapter_width=8, block_size=4, trainable_modules=(),
)  # fmt: skip


def narrow_views(self, spans):
    """The old path: plain views of ``flat``, one autograd ``narrow`` node each."""
    return tuple(self.flat.narrow(0, off, n).view(shape) for off, n, shape in spans)


def _supernet(old_path: bool, seed: int = 0):
    model, batch = tiny_model("bert", seed=seed)
    handle = attach(model, SPACE)
    bank = handle.bank
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero up-projections and biases: every term has a gradient
        bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen) * 0.2)
    handle.mask_blocks([1, 4, 9, 10, bank.num_blocks - 1])
    if old_path:
        bank._views = types.MethodType(narrow_views, bank)
    return model, batch, handle


def _micro_batches(batch, n):
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, batch["input_ids"].shape, generator=gen)
        out.append({**batch, "input_ids": ids})
    return out


def _assert_grads_equal(got, want):
    """Bitwise in fp32 (same GEMMs, same summation order), with a 1e-6 relative fallback message."""
    if not torch.equal(got, want):
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-6, f"gradients differ: max relative error {err:.3g}"


@pytest.mark.parametrize("joint", [False, True], ids=["backward_each", "one_backward"])
def test_gradients_equal_the_narrow_path_under_accumulation(joint):
    """Tiny BERT supernet (LoRA + parallel + serial adapters, masked blocks), three micro-batches
    per step, two optimizer steps with gradient clipping, a compaction in between: ``flat.grad``
    after every backward and the parameters after every step equal the plain-view path's."""
    new, old = _supernet(False), _supernet(True)
    for model, _, _ in (new, old):
        model.train()
    opts = [h.optimizer(lr=1e-2) for _, _, h in (new, old)]
    mbs = _micro_batches(new[1], 3)
    for step in range(3):
        if step == 2:  # compaction replaces the parameter: the views follow the new one
            for (_, _, h), opt in zip((new, old), opts, strict=True):
                h.compact(optimizer=opt)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if joint:  # several forwards, one backward of their sum
            for model, _, _ in (new, old):
                sum(model(**b).loss for b in mbs).backward()
            _assert_grads_equal(new[2].bank.flat.grad, old[2].bank.flat.grad)
        else:
            for b in mbs:
                for model, _, _ in (new, old):
                    model(**b).loss.backward()
                _assert_grads_equal(new[2].bank.flat.grad, old[2].bank.flat.grad)
        for (_, _, h), opt in zip((new, old), opts, strict=True):
            torch.nn.utils.clip_grad_norm_([h.bank.flat], 0.5)
            opt.step()
        _assert_grads_equal(new[2].bank.flat.detach(), old[2].bank.flat.detach())


def test_forwards_then_separate_backwards():
    """Two forwards with grad, then a backward of each (micro-batches kept alive): one buffer per
    backward, and the sum equals the narrow path's."""
    (m_new, batch, h_new), (m_old, _, h_old) = _supernet(False), _supernet(True)
    mbs = _micro_batches(batch, 2)
    for model in (m_new, m_old):
        losses = [model(**b).loss for b in mbs]
        before = FlatGrad.allocations
        for loss in losses:
            loss.backward()
        if model is m_new:
            assert FlatGrad.allocations - before == 2
    _assert_grads_equal(h_new.bank.flat.grad, h_old.bank.flat.grad)


class _FullSizeAllocs(TorchDispatchMode):
    """Counts tensors of exactly ``numel`` elements created by non-view, non-in-place ops."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        fresh = not schema.is_mutable and not any(r.alias_info for r in schema.returns)
        if fresh and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.count += 1
        return out


def test_one_full_size_gradient_per_backward():
    """The new path allocates one full-size tensor per backward (the buffer autograd adopts as
    ``flat.grad``, no copy); the narrow path one per view."""
    counts = {}
    for old in (False, True):
        model, batch, handle = _supernet(old)
        flat = handle.bank.flat
        ptrs: list[int] = []

        def spy(self, _orig=_Sink.buffer, _ptrs=ptrs):
            buf = _orig(self)
            _ptrs.append(buf.data_ptr())
            return buf

        loss = model(**batch).loss
        mode = _FullSizeAllocs(flat.numel())
        before = FlatGrad.allocations
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("prunepeft.ops._Sink.buffer", spy)
            with mode:
                loss.backward()
        counts[old] = mode.count
        if not old:
            assert FlatGrad.allocations - before == 1
            assert flat.grad.data_ptr() == ptrs[0]  # adopted, not copied
            # a second backward (gradient accumulation) adds one more buffer into .grad in place
            loss2 = model(**batch).loss
            g_ptr = flat.grad.data_ptr()
            with _FullSizeAllocs(flat.numel()) as mode2:
                loss2.backward()
            assert mode2.count == 1 and flat.grad.data_ptr() == g_ptr
    assert counts[False] == 1, counts
    assert counts[True] > 10, counts  # one zero tensor per narrow view (2 layers x ~15 views)


def test_post_accumulate_hook_fires_once_per_backward():
    """A post-accumulate-grad hook on ``flat`` (how the bank is averaged under DDP) fires once per
    backward and sees the full accumulated gradient."""
    (m_new, batch, h_new), (m_old, _, h_old) = _supernet(False), _supernet(True)
    seen = {True: [], False: []}
    for old, h in ((False, h_new), (True, h_old)):
        h.bank.flat.register_post_accumulate_grad_hook(lambda p, _o=old: seen[_o].append(p.grad.clone()))
    for b in _micro_batches(batch, 3):
        for model in (m_new, m_old):
            model(**b).loss.backward()
    assert len(seen[False]) == len(seen[True]) == 3
    for got, want in zip(seen[False], seen[True], strict=True):
        _assert_grads_equal(got, want)


def test_no_grad_eval_allocates_no_gradient_buffer():
    model, batch, handle = _supernet(False)
    bank = handle.bank
    before = FlatGrad.allocations
    with torch.no_grad():
        with _FullSizeAllocs(bank.flat.numel()) as mode:
            model(**batch)
    assert mode.count == 0 and FlatGrad.allocations == before
    assert bank._flat_grad is None and bank.flat.grad is None
    model(**batch).loss.backward()  # a training forward builds one
    assert bank._flat_grad is not None and FlatGrad.allocations == before + 1


def test_views_are_renewed_after_an_optimizer_step():
    """One FlatGrad per parameter version: micro-batches of a step share it, a step makes a new one."""
    model, batch, handle = _supernet(False)
    bank = handle.bank
    opt = handle.optimizer(lr=1e-2)
    model(**batch).loss.backward()
    first = bank._flat_grad
    model(**batch).loss.backward()
    assert bank._flat_grad is first
    opt.step()
    model(**batch).loss.backward()
    assert bank._flat_grad is not first


# ----------------------------------------------------------------------------- grouped down-projection

# q: LoRA 8 + gelu parallel adapter 4 (out 21); k: LoRA 4 (out 9); v: LoRA 12 (out 13); in 19
GROUP = (("q", 21, 8, 4), ("k", 9, 4, 0), ("v", 13, 12, 0))


def _group_sites(mask: bool = True):
    specs = group_specs(GROUP)
    bank = ModuleBank(specs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen) * 0.5)
    if mask:
        bank.mask_blocks([1, 5, 9])
    torch.manual_seed(0)
    sites = {site: BottleneckSite(torch.nn.Linear(19, out), site, bank) for site, out, *_ in GROUP}
    assert bank.input_group("q") is not None
    return bank, sites


def _per_site(bank, x, site):
    """One site's input-tap output computed alone (the reference op on its own slab)."""
    d, ut, pieces, scale = bank.slab(site, "input")
    return bottleneck_reference(x, d, ut, pieces, scale)


def test_stacked_equals_per_site_reference():
    bank, _ = _group_sites()
    gid = bank.input_group("q")
    x = torch.randn(3, 5, 19, requires_grad=True)
    d, sites, layout, scale = bank.group_slabs(gid)
    assert d.shape == (layout.width, 19)
    got = bottleneck_stacked(x, d, sites, scale)
    want = [_per_site(bank, x, s.site) for s in layout.sites]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    gouts = [torch.randn_like(w) for w in want]
    g_got = torch.autograd.grad(got, [x, bank.flat], gouts)
    g_want = torch.autograd.grad(want, [x, bank.flat], gouts)
    for g, w in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _count(monkeypatch):
    calls = []
    for name in ("bottleneck", "bottleneck_stacked"):
        fn = getattr(modules_mod, name)
        monkeypatch.setattr(
            modules_mod, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k)
        )
    return calls


@pytest.mark.parametrize(
    "order, which, n_stacked, n_alone",
    [
        ("qkv", "xxx", 1, 0),  # one GEMM for the three down-projections
        ("vkq", "xxx", 1, 0),  # any site may come first
        ("qkv", "xyx", 1, 1),  # k on another tensor computes its own; v still takes the group's
        ("kqv", "yxx", 1, 1),  # k launched the group on x, q on y runs alone
    ],
)
def test_grouped_cpu_path_and_siblings_on_another_tensor(monkeypatch, order, which, n_stacked, n_alone):
    """The reference path computes a layout group's down-projections once per shared input; a
    sibling called with another tensor computes its own; outputs and gradients equal per-site
    computation, whatever the call order."""
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    calls = _count(monkeypatch)
    bank, sites = _group_sites()
    gen = torch.Generator().manual_seed(4)
    xs = {c: torch.randn(2, 4, 19, generator=gen).requires_grad_() for c in "xy"}
    inputs = dict(zip("qkv", (xs[c] for c in which), strict=True))
    outs = {s: sites[s](inputs[s]) for s in order}
    assert calls.count("bottleneck_stacked") == n_stacked and calls.count("bottleneck") == n_alone, calls
    assert bank._pending is None  # nothing kept alive once the siblings have run
    loss = sum((outs[s] * (i + 1)).sum() for i, (s, *_) in enumerate(GROUP))
    got = torch.autograd.grad(loss, [xs["x"], xs["y"], bank.flat], allow_unused=True)
    # per site, alone
    want_outs = {s: sites[s].base(inputs[s]) + _per_site(bank, inputs[s], s) for s in order}
    for s in order:
        torch.testing.assert_close(outs[s], want_outs[s], rtol=1e-5, atol=1e-6)
    loss_w = sum((want_outs[s] * (i + 1)).sum() for i, (s, *_) in enumerate(GROUP))
    want = torch.autograd.grad(loss_w, [xs["x"], xs["y"], bank.flat], allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_grouped_path_under_no_grad_then_grad(monkeypatch):
    """Under ``torch.no_grad()`` the reference path runs site by site (inference keeps per-module
    numerics); grad mode is part of the stash key, so a grad-mode group is not taken by a no-grad
    sibling."""
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    calls = _count(monkeypatch)
    bank, sites = _group_sites(mask=False)
    x = torch.randn(3, 19)
    with torch.no_grad():
        for s in "qkv":
            sites[s](x)
    assert calls == ["bottleneck"] * 3, calls
    calls.clear()
    sites["q"](x)  # grad: the group, k's and v's outputs stashed
    with torch.no_grad():
        sites["k"](x)  # refuses the grad-mode output, runs alone
    sites["v"](x)
    assert calls == ["bottleneck_stacked", "bottleneck"], calls
    assert bank._pending is None


def test_triton_path_gradients_equal_the_narrow_path(monkeypatch):
    """The Triton Functions (interpreter on CPU) take the new views too: the group's region and
    the per-site slabs reach ``flat.grad`` through one buffer, equal to the plain-view path."""
    pytest.importorskip("triton")
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "triton")
    grads = {}
    for old in (False, True):
        bank, sites = _group_sites()
        if old:
            bank._views = types.MethodType(narrow_views, bank)
        x = torch.randn(2, 3, 19, generator=torch.Generator().manual_seed(9))
        before = FlatGrad.allocations
        for _ in range(2):  # two backwards: accumulation
            sum((sites[s](x) * (i + 1)).sum() for i, (s, *_) in enumerate(GROUP)).backward()
        if not old:
            assert FlatGrad.allocations - before == 2
        grads[old] = bank.flat.grad.clone()
    _assert_grads_equal(grads[False], grads[True])


def test_bottleneck_adds_itself_to_the_linear_output_in_one_gemm():
    """``acc``: in grad mode ``acc + bottleneck`` is one ``addmm`` (values and gradients equal the
    plain sum); under ``no_grad`` and for an ``acc`` of another dtype it is the plain sum, to the bit."""
    bank, sites = _group_sites()
    x = torch.randn(2, 4, 19, requires_grad=True)
    for site in ("q", "k"):  # q: LoRA + a gelu adapter with biases; k: LoRA alone
        d, ut, pieces, scale = bank.slab(site, "input")
        y = sites[site].base(x)
        got = bottleneck_reference(x, d, ut, pieces, scale, acc=y)
        want = y + bottleneck_reference(x, d, ut, pieces, scale)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        chain, fn = [], got.grad_fn  # k: View <- Addmm; q: Add (the adapter's up bias) <- View <- Addmm
        while fn is not None and len(chain) < 3:
            chain.append(fn.name())
            fn = fn.next_functions[0][0]
        assert "AddmmBackward0" in chain, chain
        gout = torch.randn_like(want)
        g_got = torch.autograd.grad(got, [x, bank.flat], gout, retain_graph=True)  # y is shared
        g_want = torch.autograd.grad(want, [x, bank.flat], gout)
        for g, w in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            y0 = sites[site].base(x)
            assert torch.equal(
                bottleneck_reference(x, d, ut, pieces, scale, acc=y0),
                y0 + bottleneck_reference(x, d, ut, pieces, scale),
            )
        y64 = y.detach().double()
        assert torch.equal(
            bottleneck_reference(x, d, ut, pieces, scale, acc=y64),
            y64 + bottleneck_reference(x, d, ut, pieces, scale).double(),
        )


def _graph_nodes(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_tapped_linear_equals_the_separate_path(monkeypatch):
    """Training forwards compute a frozen ``nn.Linear`` and its input-tap candidates' down-projection
    in one node (``linear_tap``: one input gradient, the up-projection added in place): the loss, the
    bank's gradient and the input's gradient (trainable embeddings) equal the separate path (the
    linear's own forward, autograd summing two input gradients) to float rounding; the grouped q/k/v
    and the lone o site both take it; a linear with a forward hook keeps its own forward."""
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    got = {}
    for tapped in (True, False):
        model, batch, handle = _supernet(False)
        emb = model.bert.embeddings.word_embeddings.weight
        emb.requires_grad_(True)
        if not tapped:
            monkeypatch.setattr(BottleneckSite, "_tapped_base", lambda self, x, bank: None)
        loss = model(**batch).loss
        nodes = _graph_nodes(loss)
        loss.backward()
        got[tapped] = (loss.detach(), handle.bank.flat.grad.clone(), emb.grad.clone(), nodes)
    layers = model.config.num_hidden_layers
    assert got[True][3].count("_LinearTapBackward") == 2 * layers  # per layer: the q/k/v group, o
    assert "_LinearTapBackward" not in got[False][3]
    for a, b in zip(got[True][:3], got[False][:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    monkeypatch.undo()
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    model, batch, handle = _supernet(False)
    fired = []
    o = model.bert.encoder.layer[0].attention.output.dense
    o.base.register_forward_hook(lambda *a: fired.append(1))
    loss = model(**batch).loss
    assert fired == [1] and _graph_nodes(loss).count("_LinearTapBackward") == 2 * layers - 1
