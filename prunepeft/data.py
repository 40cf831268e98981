"""Task data for the search and for training: read a task, batch it for a transformers model (ARCHITECTURE.md §5).

:func:`load_task` reads a train (and optionally an eval) set into a :class:`Task`, a list of
:class:`Example` per split plus what the search needs to know about the task (kind, labels, metrics).
:func:`batches` turns examples into padded tensor batches ready for ``model(**batch)``.

Sources (``train`` / ``eval``):

=====================  ======================================================================
source                 how it is read
=====================  ======================================================================
``.tsv``               GLUE style: split on tabs, **no quoting** (``csv.QUOTE_NONE``: many GLUE
                       sentences start with ``"``), lines end at ``\\n`` only, fields are kept as
                       they are (SST-2's trailing spaces survive). Blank lines are skipped.
``.csv``               standard CSV (``csv`` module, double-quote quoting).
``.jsonl`` / ``.json`` one JSON object per line (a ``.json`` file may instead hold one JSON list of
                       objects). Blank lines are skipped.
directory              ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` output;
                       ``"dir::split"`` names a split of a ``DatasetDict`` (default: ``train`` for
                       the train set; ``validation``, else ``dev``, for the eval set). Needs the
                       optional ``datasets`` package, imported only here.
=====================  ======================================================================

Files without a header (``header=False``) name their columns by position: ``"0"``, ``"1"``, ...
Every bad input raises a ``ValueError`` that names the file, the line and the column concerned.

GLUE and SuperGLUE files in their original layouts load without any column option when the file sits
in a directory named after its task (``.../CoLA/train.tsv``, ``.../BoolQ/val.jsonl``; case, ``-`` and
``_`` are ignored): :data:`TASK_LAYOUTS` is the one table of what is detected (text and label
columns, a header or none, derived texts for COPA, WiC and WSC, and the tasks that are not supported).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

KINDS = ("classification", "regression", "causal_lm")
"""Task kinds :func:`load_task` knows."""

METRICS = {
    "classification": ("accuracy", "f1", "matthews"),
    "regression": ("pearson", "spearman"),
    "causal_lm": ("perplexity",),
}
"""Metric names :func:`prunepeft.metrics.compute_metrics` returns for each kind (the first is primary)."""

TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),  # RTE, STS-B, WNLI, MNLI
    ("question", "sentence"),  # QNLI
    ("question1", "question2"),  # QQP
    ("premise", "hypothesis"),  # SNLI, SuperGLUE CB / RTE / AX-g
    ("sentence",),  # SST-2, CoLA
    ("text",),
    ("content",),
)
"""Text columns tried in order when ``text_columns`` is not given: GLUE pairs first, then single texts."""

LABEL_COLUMN_CANDIDATES = ("label", "score", "labels", "target")
"""Label columns tried in order when ``label_column`` is not given."""

_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


@dataclass(frozen=True, slots=True)
class Example:
    """One example.

    Attributes:
        text_a: the (first) text; for ``causal_lm`` the full text ``prompt + response``.
        text_b: the second text of a pair task (RTE, STS-B, QNLI ...), else ``None``.
        label: class index into :attr:`Task.label_names` (classification), a float (regression) or
            ``None`` (causal_lm).
        prompt: the prompt of a causal-LM example (no loss on it), else ``None``.
        response: the response of a causal-LM example (the loss is on it), else ``None``.
    """

    text_a: str
    text_b: str | None = None
    label: int | float | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass
class Task:
    """A task's data and what the search needs to know about it. Build it with :func:`load_task`.

    Attributes:
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        train: the training examples, in file order.
        eval: the evaluation examples, in file order (``[]`` when there is no eval set).
        label_names: class names for classification (``Example.label`` indexes this list), else ``[]``.
        text_columns: the columns the texts came from (prompt and response columns for causal_lm).
        label_column: the column the labels came from (``None`` for causal_lm).
    """

    kind: str
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def num_labels(self) -> int:
        """Number of model outputs: classes for classification, 1 for regression, 0 for causal_lm."""
        if self.kind == "classification":
            return len(self.label_names)
        return 1 if self.kind == "regression" else 0

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Metrics reported for this task, primary first (see :mod:`prunepeft.metrics`)."""
        return METRICS[self.kind]

    @property
    def primary_metric(self) -> str:
        """The metric the search compares: accuracy, pearson or perplexity (lower is better)."""
        return METRICS[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger :attr:`primary_metric` is better (False only for perplexity)."""
        return self.kind != "causal_lm"

    def class_balanced_subset(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` training examples, as equal per class as possible, for a low-fidelity warm-up.

        Classification: each class gets ``n // C`` examples; classes too small to fill their share
        give all they have and the rest is spread over the others; the ``n % C`` leftover examples go
        to classes drawn with ``seed``. Which examples of a class are taken, and the order of the
        result (classes interleaved at random), depend only on ``seed``. Regression and causal_lm: a
        seeded random subset. ``n`` larger than the train set gives the whole set, shuffled.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        rng = random.Random(seed)
        if self.kind != "classification":
            idx = rng.sample(range(len(self.train)), min(n, len(self.train)))
            return [self.train[i] for i in idx]
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(self.train):
            groups.setdefault(int(ex.label), []).append(i)  # type: ignore[arg-type]
        classes = sorted(groups)
        for c in classes:
            rng.shuffle(groups[c])
        quota = dict.fromkeys(classes, 0)
        left = {c: len(groups[c]) for c in classes}
        remaining = min(n, len(self.train))
        active = classes
        while remaining > 0 and active:
            share = remaining // len(active)
            if share == 0:  # fewer examples to place than classes: a seeded draw of classes gets one
                for c in rng.sample(active, remaining):
                    quota[c] += 1
                break
            for c in active:
                take = min(share, left[c])
                quota[c] += take
                left[c] -= take
                remaining -= take
            active = [c for c in active if left[c] > 0]
        picked = [i for c in classes for i in groups[c][: quota[c]]]
        rng.shuffle(picked)
        return [self.train[i] for i in picked]

    def split_validation(self, size: int | float | None = None, seed: int = 0) -> tuple[Task, list[Example]]:
        """Carve a validation split out of the training data: ``(task without it, validation examples)``.

        The split every decision of a search or a benchmark uses (in-search evaluation, learning-rate
        choice), so that the eval set is read only once, for the final metric.

        Args:
            size: examples to hold out: an ``int``, or a ``float`` in (0, 1) meaning that fraction of
                the training data. ``None``: :data:`DEFAULT_VALIDATION` (10 %, at most 1,000). 0
                holds out nothing.
            seed: the draw (the default 0 gives the same split whatever the training seed, so every
                seed of a benchmark trains on the same examples and is selected on the same split).

        The split is deterministic and class-stratified: classification holds out
        ``round(size * share)`` examples of every class, at least one of each class that has two or
        more (so every class is validated and still trained on); regression takes evenly spaced
        examples of the label-sorted data (the whole label range); causal_lm a seeded random subset.
        Held-out and remaining examples both keep the training file's order.
        """
        n = len(self.train)
        k = resolve_validation_size(size, n)
        if k == 0:
            return self, []
        if k >= n:
            raise ValueError(
                f"validation size {size!r} would hold out all {n} training examples; choose fewer"
            )
        rng = random.Random(seed)
        if self.kind == "classification":
            groups: dict[int, list[int]] = {}
            for i, ex in enumerate(self.train):
                groups.setdefault(int(ex.label), []).append(i)  # type: ignore[arg-type]
            # largest-remainder apportionment of k over the classes, >= 1 per class of >= 2 examples
            shares = {c: k * len(g) / n for c, g in groups.items()}
            quota = {
                c: min(len(g) - 1, max(1, int(shares[c]))) if len(g) > 1 else 0 for c, g in groups.items()
            }
            order = sorted(groups, key=lambda c: (int(shares[c]) - shares[c], c))
            while sum(quota.values()) < k and any(quota[c] < len(groups[c]) - 1 for c in order):
                for c in order:
                    if sum(quota.values()) < k and quota[c] < len(groups[c]) - 1:
                        quota[c] += 1
            held = set()
            for c in sorted(groups):
                held.update(rng.sample(groups[c], quota[c]))
        elif self.kind == "regression":
            by_label = sorted(range(n), key=lambda i: (float(self.train[i].label), i))  # type: ignore[arg-type]
            offset = rng.random()
            held = {by_label[min(n - 1, int((j + offset) * n / k))] for j in range(k)}
        else:
            held = set(rng.sample(range(n), k))
        val = [ex for i, ex in enumerate(self.train) if i in held]
        rest = [ex for i, ex in enumerate(self.train) if i not in held]
        return Task(self.kind, rest, self.eval, self.label_names, self.text_columns, self.label_column), val


DEFAULT_VALIDATION = 0.1
"""Default validation split: 10 % of the training examples, at most :data:`MAX_DEFAULT_VALIDATION`."""
MAX_DEFAULT_VALIDATION = 1000


def resolve_validation_size(size: int | float | None, n_train: int) -> int:
    """The number of examples a validation ``size`` (see :meth:`Task.split_validation`) holds out of ``n_train``."""
    if size is None:
        return min(MAX_DEFAULT_VALIDATION, int(round(DEFAULT_VALIDATION * n_train)))
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"validation size must be an int, a fraction in (0, 1) or None, got {size!r}")
    if isinstance(size, float):
        if not 0 < size < 1:
            raise ValueError(f"a fractional validation size must be in (0, 1), got {size}")
        return max(1, int(round(size * n_train)))
    if size < 0:
        raise ValueError(f"validation size must be >= 0, got {size}")
    return size


# --------------------------------------------------------------------------------------------------
# GLUE and SuperGLUE: the original file layouts, detected from the task's directory name


def _copa_texts(row: dict[str, Any]) -> dict[str, str]:
    questions = {"cause": "What was the cause?", "effect": "What happened as a result?"}
    if row["question"] not in questions:
        raise ValueError(f"'question' must be 'cause' or 'effect', got {row['question']!r}")
    return {
        "premise_question": f"{row['premise']} {questions[row['question']]}",
        "choices": f"(1) {row['choice1']} (2) {row['choice2']}",
    }


def _wic_texts(row: dict[str, Any]) -> dict[str, str]:
    return {"word_sentence1": f"{row['word']}: {row['sentence1']}"}


def _wsc_texts(row: dict[str, Any]) -> dict[str, str]:
    target = row["target"]
    return {"span_question": f'Does "{target["span2_text"]}" refer to "{target["span1_text"]}"?'}


@dataclass(frozen=True)
class TaskLayout:
    """The original file layout of one GLUE / SuperGLUE task, as :func:`load_task` detects it.

    Attributes:
        benchmark: ``"GLUE"`` or ``"SuperGLUE"``.
        format: ``"tsv"`` (GLUE: tab-separated, unquoted) or ``"jsonl"`` (SuperGLUE; ``.json`` too).
        text_columns: the one or two text columns (for COPA, WiC and WSC, texts that ``derive`` builds).
        label_column: the label column (absent from the unlabeled test files).
        kind: ``"classification"`` or ``"regression"``.
        columns: the columns in file order: they name the fields of a file without a header line
            (CoLA's original files have none); ``None``: the file must have a header.
        derive: builds extra text fields from a row (their names are in ``text_columns``).
        unsupported: why the task cannot be read as single-text or pair classification.
        note: what to know about the layout (documentation: the README table shows it).
    """

    benchmark: str
    format: str
    text_columns: tuple[str, ...] = ()
    label_column: str | None = "label"
    kind: str = "classification"
    columns: tuple[str, ...] | None = None
    derive: Callable[[dict[str, Any]], dict[str, str]] | None = None
    unsupported: str | None = None
    note: str = ""


_PAIR = ("sentence1", "sentence2")
_GLUE_PAIR = ("index", "sentence1", "sentence2", "label")

#: Task directory name -> its original layouts (one per file format; RTE is in both benchmarks).
TASK_LAYOUTS: dict[str, tuple[TaskLayout, ...]] = {
    "CoLA": (TaskLayout("GLUE", "tsv", ("sentence",),
                        columns=("source", "label", "original_label", "sentence"),
                        note="train/dev have no header line"),),
    "SST-2": (TaskLayout("GLUE", "tsv", ("sentence",), columns=("sentence", "label")),),
    "MRPC": (TaskLayout("GLUE", "tsv", ("#1 String", "#2 String"), "Quality",
                        columns=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")),),
    "QQP": (TaskLayout("GLUE", "tsv", ("question1", "question2"), "is_duplicate",
                       columns=("id", "qid1", "qid2", "question1", "question2", "is_duplicate")),),
    "STS-B": (TaskLayout("GLUE", "tsv", _PAIR, "score", kind="regression",
                         columns=("index", "genre", "filename", "year", "old_index", "source1", "source2",
                                  "sentence1", "sentence2", "score")),),
    "MNLI": (TaskLayout("GLUE", "tsv", _PAIR, "gold_label",
                        note="train.tsv, dev_matched.tsv, dev_mismatched.tsv (header: 12 or 16 columns)"),),
    "QNLI": (TaskLayout("GLUE", "tsv", ("question", "sentence"),
                        columns=("index", "question", "sentence", "label")),),
    "RTE": (TaskLayout("GLUE", "tsv", _PAIR, columns=_GLUE_PAIR),
            TaskLayout("SuperGLUE", "jsonl", ("premise", "hypothesis"))),
    "WNLI": (TaskLayout("GLUE", "tsv", _PAIR, columns=_GLUE_PAIR),),
    "AX": (TaskLayout("GLUE", "tsv", ("Premise", "Hypothesis"), "Label",
                      note="diagnostic-full.tsv; AX.tsv / diagnostic.tsv carry no labels"),),
    "BoolQ": (TaskLayout("SuperGLUE", "jsonl", ("question", "passage"), note="labels true / false"),),
    "CB": (TaskLayout("SuperGLUE", "jsonl", ("premise", "hypothesis")),),
    "COPA": (TaskLayout("SuperGLUE", "jsonl", ("premise_question", "choices"), derive=_copa_texts,
                        note="2-choice task read as pair classification: text 1 = premise + 'What was the "
                        "cause?' / 'What happened as a result?', text 2 = '(1) choice1 (2) choice2', "
                        "label 0 / 1 = the right choice"),),
    "WiC": (TaskLayout("SuperGLUE", "jsonl", ("word_sentence1", "sentence2"), derive=_wic_texts,
                       note="text 1 = 'word: sentence1', text 2 = sentence2; labels true / false"),),
    "WSC": (TaskLayout("SuperGLUE", "jsonl", ("text", "span_question"), derive=_wsc_texts,
                       note="text 2 = 'Does \"span2_text\" refer to \"span1_text\"?'; labels true / false"),),
    "MultiRC": (TaskLayout("SuperGLUE", "jsonl", unsupported="its rows nest a passage's questions and their "
                           "answers; flatten them to one (passage, question + answer, label) row each"),),
    "ReCoRD": (TaskLayout("SuperGLUE", "jsonl", unsupported="it is cloze-style entity selection (a query "
                          "with @placeholder and candidate entities), not classification"),),
    "AX-b": (TaskLayout("SuperGLUE", "jsonl", _PAIR),),
    "AX-g": (TaskLayout("SuperGLUE", "jsonl", ("premise", "hypothesis")),),
}  # fmt: skip

_TASK_ALIASES = {"diagnostic": "AX"}  # GLUE's download script puts AX in glue_data/diagnostic/
_LAYOUT_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _task_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_TASKS_BY_KEY = {_task_key(n): n for n in TASK_LAYOUTS} | {_task_key(a): n for a, n in _TASK_ALIASES.items()}


def detect_layout(path: str | Path) -> tuple[str, TaskLayout] | None:
    """``(task name, layout)`` when ``path`` is a ``.tsv`` / ``.jsonl`` / ``.json`` file in a directory
    named after a GLUE or SuperGLUE task (see :data:`TASK_LAYOUTS`) in that task's format, else None."""
    path = Path(path)
    task = _TASKS_BY_KEY.get(_task_key(path.parent.name))
    fmt = _LAYOUT_FORMATS.get(path.suffix.lower())
    if task is None or fmt is None:
        return None
    layout = next((lay for lay in TASK_LAYOUTS[task] if lay.format == fmt), None)
    return None if layout is None else (task, layout)


def _known_column_names(layout: TaskLayout) -> set[str]:
    names = {*layout.text_columns, *(layout.columns or ()), *LABEL_COLUMN_CANDIDATES}
    names.update(c for cand in TEXT_COLUMN_CANDIDATES for c in cand)
    if layout.label_column:
        names.add(layout.label_column)
    return names


def _unlabeled_hint(table: _Table) -> str:
    """Why a detected layout's file has no label column ("" if it has the layout's: another one was named)."""
    if table.layout is None or table.layout.label_column in table.columns:
        return ""
    return f" ({table.task} test files carry no labels: train and evaluate on its train / dev files)"


# --------------------------------------------------------------------------------------------------
# reading tables


@dataclass
class _Table:
    """Rows read from one source, with where each row came from (for error messages)."""

    source: str
    columns: list[str]
    rows: list[dict[str, Any]]
    where: list[str]  # "line 7" / "row 3", one per row
    class_names: dict[str, list[str]] = field(default_factory=dict)  # datasets ClassLabel names by column
    task: str | None = None  # the GLUE / SuperGLUE task whose layout was detected
    layout: TaskLayout | None = None


def _split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``"dir::split"`` -> (dir, split); anything else -> (path, None)."""
    s = str(spec)
    if "::" in s and not Path(s).exists():
        path, _, split = s.rpartition("::")
        if not split:
            raise ValueError(f"empty split name in {s!r}; write 'dir::split', e.g. 'data::validation'")
        return Path(path), split
    return Path(s), None


def _read(spec: str | Path, role: str, header: bool | None, limit: int | None) -> _Table:
    path, split = _split_spec(spec)
    if not path.exists():
        raise ValueError(f"{role} file not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path, split, role, limit)
    if split is not None:
        raise ValueError(
            f"{role}: a split ('::{split}') can only be named for a datasets directory, not {path}"
        )
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(
            f"{role}: unknown file type {suffix or '(none)'!r} for {path}; expected one of "
            f"{', '.join(_EXTENSIONS)} or a datasets save_to_disk directory"
        )
    detected = detect_layout(path)
    layout = detected[1] if detected else None
    try:
        if suffix == ".tsv":
            table = _read_tsv(path, header, limit, layout)
        elif suffix == ".csv":
            table = _read_csv(path, header, limit)
        else:
            table = _read_jsonl(path, limit)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: {e}") from None
    if detected:
        table.task, table.layout = detected
        if layout.derive is not None and layout.unsupported is None:
            _derive_texts(table)
    return table


def _derive_texts(table: _Table) -> None:
    """Add the layout's derived text fields (COPA, WiC, WSC) to every row."""
    derive = table.layout.derive  # type: ignore[union-attr]
    for row, where in zip(table.rows, table.where, strict=True):
        try:
            row.update(derive(row))  # type: ignore[misc]
        except KeyError as e:
            raise ValueError(f"{table.source}, {where}: not a {table.task} row: no {e} field") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{table.source}, {where}: not a {table.task} row: {e}") from None
    for name in table.layout.text_columns:  # type: ignore[union-attr]
        if name not in table.columns:
            table.columns.append(name)


def _header_or_positions(first: list[str], header: bool, path: Path) -> list[str]:
    if not header:
        return [str(i) for i in range(len(first))]
    if len(set(first)) != len(first):
        dup = sorted({c for c in first if first.count(c) > 1})
        raise ValueError(f"{path}, line 1: duplicate column names {dup}")
    return first


def _has_header(first: list[str], header: bool | None, layout: TaskLayout | None) -> bool:
    """Whether the first line is a header: ``header`` if given; else yes, unless a detected layout names
    its columns (e.g. CoLA) and the line has that many fields, none of them a known column name."""
    if header is not None:
        return header
    if layout is None or layout.columns is None or len(first) != len(layout.columns):
        return True
    known = _known_column_names(layout)
    return any(f.strip() in known for f in first)


def _table_from_rows(
    path: Path, header: bool | None, limit: int | None, lines, what: str, layout: TaskLayout | None = None
) -> _Table:
    """Build a table from ``(line number, fields)`` pairs: header (or positional names, or a detected
    layout's names), row limit, and the field-count check shared by the TSV and CSV readers."""
    columns: list[str] | None = None
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    for lineno, fields in lines:
        if columns is None:
            if _has_header(fields, header, layout):
                columns = _header_or_positions(fields, True, path)
                continue
            names = layout.columns if header is None and layout is not None else None
            columns = list(names) if names else _header_or_positions(fields, False, path)
        if limit is not None and len(rows) >= limit:
            break
        if len(fields) != len(columns):
            raise ValueError(
                f"{path}, line {lineno}: {len(fields)} {what}, expected {len(columns)} ({', '.join(columns)})"
            )
        rows.append(dict(zip(columns, fields, strict=True)))
        where.append(f"line {lineno}")
    return _Table(str(path), columns or [], rows, where)


def _read_tsv(path: Path, header: bool | None, limit: int | None, layout: TaskLayout | None = None) -> _Table:
    def lines():
        # newline="\n": only \n ends a line (a stray \r inside a sentence stays in it); a CRLF file's \r is cut.
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            for lineno, line in enumerate(f, start=1):
                line = line[:-1] if line.endswith("\n") else line
                line = line[:-1] if line.endswith("\r") else line
                if line:
                    yield lineno, line.split("\t")

    return _table_from_rows(path, header, limit, lines(), "tab-separated fields", layout)


def _read_csv(path: Path, header: bool | None, limit: int | None) -> _Table:
    def lines():
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                for fields in reader:
                    if fields:
                        yield reader.line_num, fields
            except csv.Error as e:
                raise ValueError(f"{path}, line {reader.line_num}: malformed CSV: {e}") from None

    return _table_from_rows(path, header, limit, lines(), "fields")


def _read_jsonl(path: Path, limit: int | None) -> _Table:
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        numbered = [(f"item {i}", obj) for i, obj in enumerate(items)]
    else:
        numbered = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            if limit is not None and len(numbered) >= limit:
                break
            try:
                numbered.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}: invalid JSON ({e}); expected one object per line"
                ) from None
    for loc, obj in numbered[:limit]:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, {loc}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        where.append(loc)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # union of keys, first-seen order
    return _Table(str(path), columns, rows, where)


def _read_saved_dataset(path: Path, split: str | None, role: str, limit: int | None) -> _Table:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{role}: {path} is a directory; reading a `datasets.save_to_disk` directory needs the optional "
            "`datasets` package (pip install datasets), or pass a .tsv/.csv/.jsonl file instead"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{role}: {path} is not a datasets save_to_disk directory ({e})") from None
    source = str(path)
    if isinstance(ds, dict):  # DatasetDict
        splits = list(ds.keys())
        if split is None:
            defaults = ("train",) if role == "train" else ("validation", "dev")
            split = next((s for s in defaults if s in ds), None)
            if split is None:
                raise ValueError(
                    f"{role}: {path} holds splits {splits} and none of {list(defaults)}; "
                    f"name one as '{path}::<split>'"
                )
        elif split not in ds:
            raise ValueError(f"{role}: split {split!r} not in {path}; available splits: {splits}")
        ds = ds[split]
        source = f"{path}::{split}"
    elif split is not None:
        raise ValueError(f"{role}: {path} is a single Dataset, it has no split {split!r}")
    columns = list(ds.column_names)
    class_names = {}
    for col, feature in dict(getattr(ds, "features", None) or {}).items():
        names = getattr(feature, "names", None)
        if isinstance(names, list) and names:
            class_names[col] = [str(n) for n in names]
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        rows.append(dict(row))
        where.append(f"row {i}")
    return _Table(source, columns, rows, where, class_names)


# --------------------------------------------------------------------------------------------------
# columns and labels


def _require_columns(table: _Table, names: Sequence[str], what: str) -> None:
    for name in names:
        if name not in table.columns:
            raise ValueError(
                f"{table.source}: {what} column {name!r} not found; available columns: {table.columns}"
                + (_unlabeled_hint(table) if what == "label" else "")
            )


def _value(table: _Table, i: int, column: str) -> Any:
    row = table.rows[i]
    if column not in row:
        raise ValueError(f"{table.source}, {table.where[i]}: no {column!r} field; it has {list(row)}")
    return row[column]


def _text(table: _Table, i: int, column: str) -> str:
    v = _value(table, i, column)
    if v is None:
        raise ValueError(f"{table.source}, {table.where[i]}: {column!r} is null")
    return v if isinstance(v, str) else str(v)


def _auto_text_columns(table: _Table) -> tuple[str, ...]:
    layout = table.layout
    if layout is not None and layout.text_columns and all(c in table.columns for c in layout.text_columns):
        return layout.text_columns
    for cand in TEXT_COLUMN_CANDIDATES:
        if all(c in table.columns for c in cand):
            return cand
    tried = ", ".join("+".join(c) for c in TEXT_COLUMN_CANDIDATES)
    raise ValueError(
        f"{table.source}: could not find the text columns (tried {tried}); available columns: "
        f"{table.columns}; pass text_columns=(...) (files without a header name columns '0', '1', ...)"
    )


def _auto_label_column(table: _Table) -> str:
    layout = table.layout
    tried = LABEL_COLUMN_CANDIDATES
    if layout is not None and layout.label_column is not None:
        tried = (layout.label_column, *(c for c in tried if c != layout.label_column))
    for c in tried:
        if c in table.columns:
            return c
    raise ValueError(
        f"{table.source}: could not find a label column (tried {', '.join(tried)}); "
        f"available columns: {table.columns}; pass label_column=..." + _unlabeled_hint(table)
    )


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _class_key(table: _Table, column: str, v: Any) -> str:
    """The canonical string of a class label: strings stripped, integral numbers without ``.0``."""
    names = table.class_names.get(column)
    if names is not None and isinstance(v, int) and 0 <= v < len(names):
        return names[v]
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _sort_labels(keys: set[str]) -> list[str]:
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def _raw_labels(table: _Table, column: str) -> list[Any]:
    out = []
    for i in range(len(table.rows)):
        v = _value(table, i, column)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{table.source}, {table.where[i]}: empty label in column {column!r}")
        out.append(v)
    return out


def _regression_labels(table: _Table, column: str) -> list[float]:
    out = []
    for i, v in enumerate(_raw_labels(table, column)):
        x = _as_float(v)
        if x is None or not math.isfinite(x):
            raise ValueError(
                f"{table.source}, {table.where[i]}: regression needs numeric labels, got {v!r} in column "
                f"{column!r}"
            )
        out.append(x)
    return out


def _infer_kind(table: _Table, prompt_column: str, response_column: str, label_column: str | None) -> str:
    if prompt_column in table.columns and response_column in table.columns:
        return "causal_lm"
    column = label_column or _auto_label_column(table)
    _require_columns(table, [column], "label")
    values = [_as_float(v) for v in _raw_labels(table, column)]
    if all(x is not None and math.isfinite(x) for x in values) and any(not x.is_integer() for x in values):  # type: ignore[union-attr]
        return "regression"
    return "classification"


def _positive_or_none(name: str, v: int | None) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be a positive int or None, got {v!r}")


def load_task(
    train: str | Path,
    eval: str | Path | None = None,
    kind: str | None = None,
    text_columns: Sequence[str] | str | None = None,
    label_column: str | None = None,
    header: bool | None = None,
    max_examples: int | None = None,
    label_names: Sequence[str | int] | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_eval_examples: int | None = None,
) -> Task:
    """Read a task from files (or ``datasets`` directories) into a :class:`Task`.

    Args:
        train: the training set: a ``.tsv`` (GLUE style), ``.csv``, ``.jsonl`` / ``.json`` file, or a
            ``datasets`` ``save_to_disk`` directory (``"dir::split"`` names a split); see the module doc.
        eval: the evaluation set, the same kinds of source; ``None``: no eval set (``task.eval == []``).
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``. ``None``: ``causal_lm`` if the
            train set has the prompt and response columns, ``regression`` if its labels are numbers
            and not all integers, else ``classification``.
        text_columns: one or two column names (a pair task's two texts). ``None``: a detected GLUE /
            SuperGLUE layout's (:data:`TASK_LAYOUTS`), else the first of the GLUE names
            (sentence1+sentence2, question+sentence, question1+question2, premise+hypothesis), else a
            single ``sentence``, ``text`` or ``content`` column.
        label_column: ``None``: a detected layout's, else the first of ``label``, ``score``,
            ``labels``, ``target``.
        header: whether a ``.tsv`` / ``.csv`` file starts with a header line; without one the columns
            are named by position, ``"0"``, ``"1"``, ... ``None``: yes, except for a GLUE file in a
            detected layout without one (CoLA's train / dev), whose columns get the layout's names.
        max_examples: keep only the first N train rows (deterministic; the rest is not read).
        label_names: the class labels in the order of the model's outputs (strings, or ints meaning
            their string form). ``None``: the sorted unique train labels (numerically when all are
            integers; a ``datasets`` ClassLabel column keeps its own order). Given, the train set may
            hold fewer than two of them (e.g. a few rows to evaluate a trained model on).
        prompt_column: the prompt column of a causal-LM set.
        response_column: the response column of a causal-LM set.
        max_eval_examples: keep only the first N eval rows (``None``: all).

    Raises:
        ValueError: a missing file, an unknown file type, a missing column (the message lists the
            available ones), no rows, a classification train set with fewer than 2 classes (without
            ``label_names``), labels outside ``label_names`` or eval labels unseen in train,
            non-numeric regression labels, a row with the wrong number of fields (the message names
            its line), causal-LM rows without a prompt or response, an unsupported GLUE / SuperGLUE
            task (MultiRC, ReCoRD) read without ``text_columns``.
        ImportError: a directory is given and ``datasets`` is not installed.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    _positive_or_none("max_examples", max_examples)
    _positive_or_none("max_eval_examples", max_eval_examples)
    if isinstance(text_columns, str):
        text_columns = (text_columns,)
    if text_columns is not None:
        text_columns = tuple(text_columns)
        if len(text_columns) not in (1, 2) or not all(isinstance(c, str) for c in text_columns):
            raise ValueError(f"text_columns must be 1 or 2 column names, got {text_columns!r}")

    tables = [_read(train, "train", header, max_examples)]
    if eval is not None:
        tables.append(_read(eval, "eval", header, max_eval_examples))
    for t in tables:
        if not t.rows:
            raise ValueError(f"{t.source} has no examples")
    tr = tables[0]
    if tr.layout is not None and tr.layout.unsupported and text_columns is None:
        raise ValueError(
            f"{tr.source}: {tr.task} is not supported: {tr.layout.unsupported} (pass text_columns and "
            "label_column to read such a flattened file)"
        )

    if kind is None and tr.layout is not None and (label_column or tr.layout.label_column) in tr.columns:
        kind = tr.layout.kind
    if kind is None:
        kind = _infer_kind(tr, prompt_column, response_column, label_column)
    if label_names is not None and kind != "classification":
        raise ValueError(f"label_names only applies to classification, not {kind}")

    if kind == "causal_lm":
        splits = []
        for t in tables:
            _require_columns(t, [prompt_column, response_column], "causal_lm")
            exs = []
            for i in range(len(t.rows)):
                p, r = _text(t, i, prompt_column), _text(t, i, response_column)
                exs.append(Example(text_a=p + r, prompt=p, response=r))
            splits.append(exs)
        return Task(
            kind, splits[0], splits[1] if eval is not None else [], [], (prompt_column, response_column)
        )

    text_columns = text_columns or _auto_text_columns(tr)
    label_column = label_column or _auto_label_column(tr)
    for t in tables:
        _require_columns(t, text_columns, "text")
        _require_columns(t, [label_column], "label")

    def texts(t: _Table, i: int) -> tuple[str, str | None]:
        return _text(t, i, text_columns[0]), (
            _text(t, i, text_columns[1]) if len(text_columns) == 2 else None
        )

    if kind == "regression":
        splits = [
            [Example(*texts(t, i), label=y) for i, y in enumerate(_regression_labels(t, label_column))]
            for t in tables
        ]
        return Task(kind, splits[0], splits[1] if eval is not None else [], [], text_columns, label_column)

    keys = [[_class_key(t, label_column, v) for v in _raw_labels(t, label_column)] for t in tables]
    seen = set(keys[0])
    if label_names is None and len(seen) < 2:
        raise ValueError(
            f"{tr.source}: classification needs at least 2 classes, found {len(seen)} ({sorted(seen)}) in "
            f"column {label_column!r}" + (" (max_examples keeps only the first rows)" if max_examples else "")
        )
    if label_names is not None:
        names = [str(n).strip() for n in label_names]
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {names}")
        if len(names) < 2:
            raise ValueError(f"label_names needs at least 2 classes, got {names}")
        unknown = sorted(seen - set(names))
        if unknown:
            raise ValueError(f"{tr.source}: train labels {unknown} are not in label_names {names}")
    elif label_column in tr.class_names:
        names = tr.class_names[label_column]
    else:
        names = _sort_labels(seen)
    if eval is not None:
        unseen = sorted(set(keys[1]) - seen)
        if unseen:
            raise ValueError(
                f"{tables[1].source}: eval labels {unseen} do not occur in the train set (train labels: "
                f"{_sort_labels(seen)})"
            )
    index = {n: j for j, n in enumerate(names)}
    splits = [
        [Example(*texts(t, i), label=index[k]) for i, k in enumerate(ks)]
        for t, ks in zip(tables, keys, strict=True)
    ]
    return Task(kind, splits[0], splits[1] if eval is not None else [], names, text_columns, label_column)


# --------------------------------------------------------------------------------------------------
# batching


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token"
        )
    return int(pad)


def _pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "left":
                out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _encode_classification(
    chunk: list[Example], tokenizer: Any, max_length: int, kind: str
) -> dict[str, torch.Tensor]:
    pairs = [ex.text_b is not None for ex in chunk]
    if any(pairs) and not all(pairs):
        raise ValueError("a batch mixes single texts and text pairs (text_b is None for some examples only)")
    a = [ex.text_a for ex in chunk]
    b = [ex.text_b for ex in chunk] if all(pairs) else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
    side = getattr(tokenizer, "padding_side", "right")
    batch = {
        "input_ids": _pad(enc["input_ids"], _pad_id(tokenizer), side),
        "attention_mask": _pad([[1] * len(s) for s in enc["input_ids"]], 0, side),
    }
    if "token_type_ids" in enc:
        batch["token_type_ids"] = _pad(
            enc["token_type_ids"], int(getattr(tokenizer, "pad_token_type_id", 0)), side
        )
    labels = [ex.label for ex in chunk]
    if all(y is not None for y in labels):
        dtype = torch.long if kind == "classification" else torch.float32
        batch["labels"] = torch.tensor(labels, dtype=dtype)
    elif any(y is not None for y in labels):
        raise ValueError("a batch mixes labelled and unlabelled examples")
    return batch


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has a chat template (``tokenizer.chat_template`` set and not empty)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn of ``tokenizer``'s chat template, followed by the generation prompt
    (the text a chat model answers), e.g. ``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n``
    (templates may add a default system turn). What :func:`batches` trains on with ``chat_template``;
    for generation, tokenize it with ``add_special_tokens=False`` (the template holds them)."""
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is not set)")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):
        raise ValueError(
            f"the tokenizer's apply_chat_template(tokenize=False) gave {type(text).__name__}, not text"
        )
    return text


def _encode_causal(
    chunk: list[Example], tokenizer: Any, max_length: int, chat: bool = False
) -> dict[str, torch.Tensor]:
    if any(ex.prompt is None or ex.response is None for ex in chunk):
        raise ValueError(
            "kind='causal_lm' needs examples with prompt and response (load the task as causal_lm)"
        )
    prompts = [chat_prompt(tokenizer, ex.prompt) if chat else ex.prompt for ex in chunk]  # type: ignore[arg-type]
    enc = tokenizer(
        [p + ex.response for p, ex in zip(prompts, chunk, strict=True)],  # type: ignore[operator]
        add_special_tokens=not chat,  # a chat template writes its own special tokens
        return_offsets_mapping=True,
        truncation=False,
        padding=False,
    )
    eos = getattr(tokenizer, "eos_token_id", None)
    ids_out, labels_out = [], []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        cut = len(prompt)
        ids = list(ids)
        # A token is a target iff it covers text and starts in the response; special tokens the
        # tokenizer adds (empty spans) and tokens straddling the prompt/response boundary are masked.
        labels = [t if (e > s and s >= cut) else -100 for t, (s, e) in zip(ids, offsets, strict=True)]
        if eos is not None:
            if ids and ids[-1] == eos:
                labels[-1] = eos  # the tokenizer already ends with eos: learn to stop
            else:
                ids.append(eos)
                labels.append(eos)
        ids_out.append(ids[:max_length])
        labels_out.append(labels[:max_length])
    return {
        "input_ids": _pad(ids_out, _pad_id(tokenizer)),
        "attention_mask": _pad([[1] * len(s) for s in ids_out], 0),
        "labels": _pad(labels_out, -100),
    }


def batches(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    kind: str = "classification",
    chat_template: bool | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass (epoch) over ``examples`` as padded batches for ``model(**batch)``; the caller loops epochs.

    Each batch is padded to its longest sequence (not to ``max_length``) and holds ``input_ids``,
    ``attention_mask``, ``token_type_ids`` when the tokenizer makes them (not for causal_lm), and
    ``labels`` (long for classification, float32 for regression) when the examples have labels.

    Classification / regression: ``text_a`` (and ``text_b`` for pairs) are tokenized with truncation to
    ``max_length`` (longest first), padded on ``tokenizer.padding_side``.

    causal_lm: the text is ``prompt + response``, tokenized as one string (with the tokenizer's own
    special tokens, e.g. a BOS) and followed by ``tokenizer.eos_token_id`` if the tokenizer has one;
    ``labels`` are the input ids with the prompt tokens, the tokenizer-added special tokens and the
    padding set to -100, so the loss is on the response (and eos) only. A token is a response token if
    its character span starts at or after ``len(prompt)`` (this needs a fast tokenizer's offsets); a
    token straddling the boundary counts as prompt. Sequences are cut to ``max_length`` from the
    right and padded on the right. Rows whose response starts beyond ``max_length`` have no target
    token, and a batch of only such rows gives a NaN loss: choose ``max_length`` to fit the prompts.

    With a chat template (``chat_template``; by default whenever the tokenizer has one, e.g. an
    instruct model's), a causal-LM prompt is rendered as one user turn followed by the generation
    prompt (:func:`chat_prompt`) and the response follows as the assistant's answer, then eos (chat
    models' end-of-turn token, e.g. ``<|im_end|>``); the text is tokenized without adding special
    tokens (the template writes them) and the loss stays on the response and eos. Tokenizers without
    a template (base models) see the plain ``prompt + response``.

    Padding uses ``tokenizer.pad_token_id``, or the eos id when there is no pad token; the tokenizer is
    never modified. (A model with no pad token, e.g. GPT-2 for sequence classification, still needs its
    ``config.pad_token_id`` set by the caller.)

    Args:
        examples: the examples (e.g. ``task.train``).
        tokenizer: a Hugging Face tokenizer (a fast one for causal_lm).
        batch_size: examples per batch.
        max_length: the longest sequence, in tokens.
        shuffle: visit the examples in a random order drawn from ``torch.Generator().manual_seed(seed)``
            (same ``seed``, same order); else in order.
        seed: the shuffle seed; pass e.g. ``seed + epoch`` for a new order each epoch.
        drop_last: skip a last batch smaller than ``batch_size``.
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"`` (usually ``task.kind``).
        chat_template: causal_lm only: render prompts with the tokenizer's chat template. ``None``:
            when the tokenizer has one; ``True``: always (an error without one); ``False``: never.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if kind == "causal_lm" and not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "causal_lm batching needs a fast tokenizer (it uses offset mappings to mask the prompt)"
        )
    if chat_template is True and not has_chat_template(tokenizer):
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template (tokenizer.chat_template)"
        )
    chat = kind == "causal_lm" and (has_chat_template(tokenizer) if chat_template is None else chat_template)
    _pad_id(tokenizer)  # fail now, not at the first batch
    examples = list(examples)
    if shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(len(examples)))
    return _iter_batches(examples, order, tokenizer, batch_size, max_length, drop_last, kind, chat)


def _iter_batches(
    examples: list[Example],
    order: list[int],
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    drop_last: bool,
    kind: str,
    chat: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        chunk = [examples[i] for i in idx]
        if kind == "causal_lm":
            yield _encode_causal(chunk, tokenizer, max_length, chat)
        else:
            yield _encode_classification(chunk, tokenizer, max_length, kind)
