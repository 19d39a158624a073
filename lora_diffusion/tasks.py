"""Classification tasks as conditional generation: a prompt template, one label word per class,
and loaders that turn the staged TSV/Parquet files (or the Hugging Face Hub) into examples.

A task example is `prompt -> target`, where the prompt is the task's instruction with the input
text filled in and the target is the label word, e.g.

    Is the sentiment of this movie review positive or negative?
    Review: it's a charming and often affecting journey.
    Sentiment:                                              -> "positive"

Every data problem is reported as a `DataError` naming the file, the line and what is wrong, so
a bad file never surfaces as a stack trace from inside `csv` or `pyarrow`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lora_diffusion.registry import Registry

DATA_DIR_ENV = "LORA_DIFFUSION_DATA_DIR"
CANONICAL_SPLITS = ("train", "eval")
FILE_SUFFIXES = (".tsv", ".parquet")


class DataError(ValueError):
    """A task's data is missing or malformed; the message names the file, line and problem."""


@dataclass(frozen=True)
class Task:
    """A classification task phrased as prompt -> label word."""

    name: str = field(metadata={"help": "registry name, e.g. 'sst2'"})
    instruction: str = field(metadata={"help": "prompt template with a `{text}` placeholder"})
    label_words: tuple[str, ...] = field(
        metadata={"help": "target text per label id: lower-case single words"}
    )
    splits: Mapping[str, str] = field(
        hash=False, metadata={"help": "canonical split ('train', 'eval') -> local file stem"}
    )
    local_dir: str = field(metadata={"help": "subfolder of the data directory"})
    hub_id: str = field(metadata={"help": "Hugging Face Hub dataset id"})
    hub_splits: Mapping[str, str] = field(
        hash=False, metadata={"help": "canonical split -> Hub split name"}
    )
    hub_config: str | None = field(default=None, metadata={"help": "Hub dataset config"})
    hub_text_field: str = field(default="sentence", metadata={"help": "Hub text column"})
    hub_label_field: str = field(default="label", metadata={"help": "Hub label column"})
    input_field: str = field(default="sentence", metadata={"help": "local text column"})
    label_field: str = field(default="label", metadata={"help": "local label column"})
    detokenize: bool = field(
        default=True, metadata={"help": "undo PTB tokenisation (`does n't` -> `doesn't`)"}
    )

    def __post_init__(self) -> None:
        if "{text}" not in self.instruction:
            raise ValueError(f"task {self.name!r}: instruction has no '{{text}}' placeholder")
        _check_label_words(self.name, self.label_words)
        for what, mapping in (("splits", self.splits), ("hub_splits", self.hub_splits)):
            missing = [s for s in CANONICAL_SPLITS if s not in mapping]
            if missing:
                raise ValueError(f"task {self.name!r}: {what} lacks {missing}")
            # Read-only, so a registered task cannot be changed behind the registry's back.
            object.__setattr__(self, what, MappingProxyType(dict(mapping)))

    def prompt(self, text: str) -> str:
        """The instruction with `text` filled in (detokenised first if the task asks for it)."""
        if self.detokenize:
            text = detokenize_ptb(text)
        return self.instruction.replace("{text}", text)


def _check_label_words(name: str, words: tuple[str, ...]) -> None:
    if not words:
        raise ValueError(f"task {name!r}: label_words is empty")
    for w in words:
        if not w or w != w.lower() or len(w.split()) != 1 or w != w.strip():
            raise ValueError(f"task {name!r}: label word {w!r} is not a lower-case single word")
    if len(set(words)) != len(words):
        raise ValueError(f"task {name!r}: label words are not unique: {words}")


@dataclass
class Example:
    """One conditional example: the model sees `prompt` and must generate `target`."""

    prompt: str
    target: str
    label: int
    text: str = field(default="", metadata={"help": "the input text alone (detokenised)"})


TASKS = Registry[Task]("task")
_TEST_SPLITS = {"train": "train", "eval": "test"}


def _glue(name: str, instruction: str, label_words: tuple[str, ...]) -> Task:
    """A GLUE task: shipped as train/dev TSVs in `name/`, on the hub as nyu-mll/glue's `name`."""
    return Task(
        name=name,
        instruction=instruction,
        label_words=label_words,
        splits={"train": "train", "eval": "dev"},
        local_dir=name,
        hub_id="nyu-mll/glue",
        hub_config=name,
        hub_splits={"train": "train", "eval": "validation"},
    )


for _task in (
    _glue(
        "sst2",
        "Is the sentiment of this movie review positive or negative?\nReview: {text}\nSentiment:",
        ("negative", "positive"),
    ),
    # The labels.txt names rather than "yes"/"no": the output then names its own task, so a
    # composed multi-task model's answers stay distinguishable, and a shared tail ("acceptable")
    # is harmless because candidates are scored over the whole target.
    _glue(
        "cola",
        "Is this sentence grammatically acceptable or unacceptable?\nSentence: {text}\nAnswer:",
        ("unacceptable", "acceptable"),
    ),
    Task(
        name="trec",
        instruction=(
            "What kind of answer does this question ask for: abbreviation, entity, "
            "description, human, location or number?\nQuestion: {text}\nAnswer type:"
        ),
        label_words=("abbreviation", "entity", "description", "human", "location", "number"),
        splits=_TEST_SPLITS,
        local_dir="trec",
        hub_id="CogComp/trec",
        hub_splits={"train": "train", "eval": "test"},
        hub_text_field="text",
        hub_label_field="coarse_label",
    ),
    Task(
        name="agnews",
        instruction=(
            "What is the topic of this news article: world, sports, business or technology?\n"
            "Article: {text}\nTopic:"
        ),
        # "technology" rather than "science": most Sci/Tech articles are about computing,
        # the internet and tech companies; space and biology stories are the minority.
        label_words=("world", "sports", "business", "technology"),
        splits=_TEST_SPLITS,
        local_dir="agnews",
        hub_id="fancyzhx/ag_news",
        hub_splits={"train": "train", "eval": "test"},
        hub_text_field="text",
        detokenize=False,
    ),
):
    TASKS.register(_task.name, _task)


def get_task(task: str | Task) -> Task:
    """The registered task called `task` (a `Task` is returned as is)."""
    return task if isinstance(task, Task) else TASKS.get(task)


# --- PTB detokenisation ------------------------------------------------------------------------

_PTB_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), repl)
    for pattern, repl in (
        (r"``\s*", '"'),  # opening quote: `` word -> "word
        (r"\s*''", '"'),  # closing quote: word '' -> word"
        (r"-lrb-\s*", "("),
        (r"\s*-rrb-", ")"),
        (r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1"),  # does n't -> doesn't, it 's -> it's
        (r"n\s+'t\b", "n't"),  # TREC writes "don 't"
        (r"\s+([,.!?;:)%])", r"\1"),
        (r"([($])\s+", r"\1"),
    )
)


def detokenize_ptb(text: str) -> str:
    """Undo Penn-Treebank tokenisation: `it 's a `` film '' ( 2002 ) .` -> `it's a "film" (2002).`

    Deliberately small: contractions, punctuation spacing, brackets and double quotes. Single
    `` ` ... ' `` quotes are left alone, as `'` is ambiguous with plural possessives.
    """
    for pattern, repl in _PTB_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


# --- locating data ---------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where the staged data lives: `$LORA_DIFFUSION_DATA_DIR`, else `../shared/data` relative
    to the working directory, else relative to the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return resolve_data_dir(env)
    repo_root = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"no data directory found (tried {tried}); set ${DATA_DIR_ENV} or pass --data-dir"
    )


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir` if given (it must exist), else `default_data_dir()`."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {path} does not exist; set ${DATA_DIR_ENV} or pass --data-dir"
        )
    return path


def _file_stem(task: Task, split: str) -> str:
    """Canonical split ('train'/'eval') or a file stem ('dev') -> the file stem."""
    if split in task.splits:
        return task.splits[split]
    if split in task.splits.values():
        return split
    raise DataError(
        f"task {task.name!r} has no split {split!r}; use one of {list(task.splits)} "
        f"(files {list(task.splits.values())})"
    )


def data_file(task: str | Task, split: str, data_dir: str | Path | None = None) -> Path:
    """The local file (`.tsv` or `.parquet`) holding `split` of `task`."""
    task = get_task(task)
    folder = resolve_data_dir(data_dir) / task.local_dir
    stem = _file_stem(task, split)
    for suffix in FILE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise DataError(
        f"task {task.name!r}: no data file {folder / stem}.tsv (or .parquet) for split {split!r}"
    )


def label_names(task: str | Task, data_dir: str | Path | None = None) -> list[str]:
    """The label names in `labels.txt`, checked to match the task's label words in number."""
    task = get_task(task)
    path = resolve_data_dir(data_dir) / task.local_dir / "labels.txt"
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"task {task.name!r}: label file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    names = [n for n in names if n]
    if len(names) != len(task.label_words):
        raise DataError(
            f"{path}: lists {len(names)} labels {names}, but task {task.name!r} has "
            f"{len(task.label_words)} label words {list(task.label_words)}"
        )
    return names


# --- reading rows ----------------------------------------------------------------------------


def _parse_label(raw: Any, num_labels: int, where: str) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not an integer") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise DataError(f"{where}: label {raw!r} is not an integer")
    if not 0 <= raw < num_labels:
        raise DataError(f"{where}: label {raw} is out of range 0..{num_labels - 1}")
    return raw


def make_example(task: Task, text: Any, label: Any, where: str) -> Example:
    """Validate one row (`where` locates it in errors) and build its prompt and target."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text in column {task.input_field!r}")
    label_id = _parse_label(label, len(task.label_words), where)
    text = text.strip()
    clean = detokenize_ptb(text) if task.detokenize else text
    return Example(task.prompt(text), task.label_words[label_id], label_id, clean)


def _decoded_lines(path: Path) -> Iterator[str]:
    """The file's lines as text; a non-UTF-8 line is a DataError naming its number and bytes."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {number}: not valid UTF-8 at byte offset {e.start}: {raw!r}"
                ) from None


def _column_index(header: list[str], column: str, path: Path) -> int:
    if column not in header:
        raise DataError(f"{path}: line 1: missing column {column!r}; columns found: {header}")
    return header.index(column)


def _read_tsv(task: Task, path: Path, limit: int | None) -> list[Example]:
    reader = csv.reader(_decoded_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    examples: list[Example] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty (expected a header line)")
        i_text = _column_index(header, task.input_field, path)
        i_label = _column_index(header, task.label_field, path)
        for row in reader:
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path}: line {reader.line_num}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, expected {len(header)} ({header})")
            examples.append(make_example(task, row[i_text], row[i_label], where))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    return examples


def records_to_examples(
    task: Task,
    records: Iterable[Mapping[str, Any]],
    columns: list[str],
    fields: tuple[str, str],
    source: str,
    limit: int | None = None,
) -> list[Example]:
    """Examples from column-named records (Parquet rows, a `datasets.Dataset`), reading the
    (text, label) `fields`; errors name `source` and the 1-based row."""
    for column in fields:
        if column not in columns:
            raise DataError(f"{source}: missing column {column!r}; columns found: {columns}")
    examples = []
    for number, record in enumerate(records, start=1):
        if limit is not None and len(examples) >= limit:
            break
        text, label = (record[f] for f in fields)
        examples.append(make_example(task, text, label, f"{source}: row {number}"))
    return examples


def _read_parquet(task: Task, path: Path, limit: int | None) -> list[Example]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    table = table.slice(0, limit) if limit is not None else table
    fields = (task.input_field, task.label_field)
    return records_to_examples(task, table.to_pylist(), table.column_names, fields, str(path))


def hub_examples(task: Task, dataset: Any, source: str, limit: int | None = None) -> list[Example]:
    """Examples from a Hub `datasets.Dataset`, read through the task's `hub_text_field` and
    `hub_label_field` columns."""
    fields = (task.hub_text_field, task.hub_label_field)
    return records_to_examples(task, dataset, list(dataset.column_names), fields, source, limit)


def _load_hub(task: Task, split: str, limit: int | None) -> list[Example]:
    import datasets

    if split not in task.hub_splits:
        raise DataError(f"task {task.name!r} has no split {split!r}; use {list(task.hub_splits)}")
    source = f"hub {task.hub_id}" + (f"/{task.hub_config}" if task.hub_config else "")
    source += f" split {task.hub_splits[split]!r}"
    try:
        dataset = datasets.load_dataset(task.hub_id, task.hub_config, split=task.hub_splits[split])
    except Exception as e:  # network, auth, missing dataset: one clear message, cause chained
        raise DataError(
            f"task {task.name!r}: cannot load {source}: {e}; offline, use the local files "
            "(--data-dir) instead"
        ) from e
    return hub_examples(task, dataset, source, limit)


_READERS = {".tsv": _read_tsv, ".parquet": _read_parquet}


def load_split(
    task: str | Task,
    split: str,
    data_dir: str | Path | None = None,
    hub: bool = False,
    limit: int | None = None,
) -> list[Example]:
    """Load `split` ('train' or 'eval', or a file stem such as 'dev') of `task` as a list of
    examples, from `data_dir/<task.local_dir>/<stem>.{tsv,parquet}` or, with `hub=True`, from
    the Hugging Face Hub. `limit` keeps the first `limit` rows."""
    task = get_task(task)
    if hub:
        return _load_hub(task, split, limit)
    path = data_file(task, split, data_dir)
    label_names(task, path.parent.parent)  # labels.txt must agree with the label words
    return _READERS[path.suffix](task, path, limit)


def task_texts(
    tasks: Iterable[str | Task], data_dir: str | Path | None = None, hub: bool = False
) -> list[str]:
    """The input texts of each task's *train* split, without instruction or label: unlabelled
    in-domain text for task-adaptive pretraining (the eval split is never read)."""
    return [e.text for t in tasks for e in load_split(t, "train", data_dir, hub=hub)]
