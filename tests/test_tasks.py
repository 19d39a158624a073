"""Task registry, PTB detokenisation and data loading, on the staged data and on malformed
files written into tmp_path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import pytest

from lora_diffusion.tasks import (
    DATA_DIR_ENV,
    TASKS,
    DataError,
    Task,
    default_data_dir,
    detokenize_ptb,
    get_task,
    hub_examples,
    label_names,
    load_split,
    task_texts,
)

DATA_DIR = default_data_dir()
ALL_TASKS = TASKS.names()


def test_the_four_tasks_are_registered_with_natural_label_words():
    assert ALL_TASKS == ["agnews", "cola", "sst2", "trec"]
    assert get_task("sst2").label_words == ("negative", "positive")
    assert get_task("trec").label_words[0] == "abbreviation"
    with pytest.raises(KeyError, match="unknown task 'mnli'; known: agnews, cola"):
        get_task("mnli")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_label_words_are_lower_case_single_words_one_per_label(name):
    task = get_task(name)
    assert all(w == w.lower() and " " not in w for w in task.label_words)
    assert len(label_names(task, DATA_DIR)) == len(task.label_words)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"instruction": "no placeholder"}, "placeholder"),
        ({"label_words": ()}, "empty"),
        ({"label_words": ("yes", "yes")}, "not unique"),
        ({"label_words": ("Yes", "no")}, "lower-case single word"),
        ({"label_words": ("very good", "bad")}, "lower-case single word"),
        ({"splits": {"train": "train"}}, "lacks \\['eval'\\]"),
    ],
)
def test_invalid_task_definitions_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_task("sst2"), **change)


def test_registered_tasks_cannot_be_mutated():
    with pytest.raises(TypeError):
        get_task("sst2").splits["eval"] = "train"  # type: ignore[index]


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_task_loads_both_splits(name, split):
    task = get_task(name)
    examples = load_split(task, split, DATA_DIR, limit=20)
    assert len(examples) == 20
    prefix, suffix = task.instruction.split("{text}")
    for ex in examples:
        assert 0 <= ex.label < len(task.label_words)
        assert ex.target == task.label_words[ex.label]
        assert ex.prompt.startswith(prefix) and ex.prompt.endswith(suffix)
        assert ex.prompt[len(prefix) : len(ex.prompt) - len(suffix)].strip()  # the text


@pytest.mark.parametrize(
    "name, split, rows, first_label",
    [("sst2", "eval", 872, 1), ("trec", "eval", 500, 5), ("cola", "dev", 1043, 1)],
)
def test_full_splits_have_the_documented_row_counts(name, split, rows, first_label):
    examples = load_split(name, split, DATA_DIR)
    assert len(examples) == rows
    assert examples[0].label == first_label


def test_prompt_contains_the_detokenised_text():
    first = load_split("sst2", "eval", DATA_DIR, limit=1)[0]
    assert "Review: it's a charming and often affecting journey.\nSentiment:" in first.prompt
    news = load_split("agnews", "eval", DATA_DIR, limit=1)[0]
    assert "Turner   Newall" in news.prompt  # agnews is not detokenised: spacing kept as is


@pytest.mark.parametrize(
    "ptb, text",
    [  # real rows of sst2/dev.tsv, trec/test.tsv and cola/train.tsv
        (
            "it 's a charming and often affecting journey .",
            "it's a charming and often affecting journey.",
        ),
        ("it 's slow -- very , very slow .", "it's slow -- very, very slow."),
        (
            "you do n't have to know about music to appreciate the film 's easygoing blend",
            "you don't have to know about music to appreciate the film's easygoing blend",
        ),
        (
            "we root for ( clara and paul ) , even like them",
            "we root for (clara and paul), even like them",
        ),
        ("the subtle strength of `` elling '' is that", 'the subtle strength of "elling" is that'),
        (
            "even horror fans will most likely not find what they 're seeking",
            "even horror fans will most likely not find what they're seeking",
        ),
        ("my reaction in a word : disappointment .", "my reaction in a word: disappointment."),
        (
            "when it costs a family of four about $ 40 to see a film",
            "when it costs a family of four about $40 to see a film",
        ),
        ("What bird can swim but can 't fly ?", "What bird can swim but can't fly?"),
        (
            "Which comedian 's signature line is `` Can we talk '' ?",
            'Which comedian\'s signature line is "Can we talk"?',
        ),
        ("a -lrb- really -rrb- good film", "a (really) good film"),
        ("I 'm sure they 'll say we 've won", "I'm sure they'll say we've won"),
        (
            "The contractor will build a house for $ 100,000.",
            "The contractor will build a house for $100,000.",
        ),
    ],
)
def test_detokenize_ptb_on_real_examples(ptb, text):
    assert detokenize_ptb(ptb) == text


def test_detokenize_leaves_ordinary_prose_alone():
    text = "Our friends won't buy this analysis, let alone the next one we propose."
    assert detokenize_ptb(text) == text


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(
        DataError, match=f"nowhere does not exist; set \\${DATA_DIR_ENV}.*--data-dir"
    ):
        default_data_dir()


def test_default_data_dir_finds_shared_data_beside_the_repo(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert (default_data_dir() / "sst2" / "labels.txt").is_file()


# --- malformed data --------------------------------------------------------------------------


def _stage(root: Path, dev: bytes | None, labels: str = "negative\npositive\n") -> Path:
    """A fake data dir with sst2/labels.txt and (unless None) sst2/dev.tsv."""
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "labels.txt").write_text(labels)
    if dev is not None:
        (root / "sst2" / "dev.tsv").write_bytes(dev)
    return root


GOOD = b"sentence\tlabel\na fine film .\t1\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"text\tlabel\na film\t1\n",
            "line 1: missing column 'sentence'; columns found: \\['text', 'label'\\]",
        ),
        (b"sentence\tlbl\na film\t1\n", "line 1: missing column 'label'"),
        (GOOD + b"a bad film\tx\n", "line 3: label 'x' is not an integer"),
        (GOOD + b"a bad film\t7\n", "line 3: label 7 is out of range 0..1"),
        (GOOD + b"a bad film\t-1\n", "line 3: label -1 is out of range"),
        (GOOD + b"\t0\n", "line 3: empty text in column 'sentence'"),
        (GOOD + b"   \t0\n", "line 3: empty text"),
        (
            GOOD + b"a caf\xe9 film\t1\n",
            "line 3: not valid UTF-8 at byte offset 5: b'a caf\\\\xe9 film",
        ),
        (GOOD + b"a film\t1\textra\n", "line 3: 3 fields, expected 2"),
        (b"", "file is empty"),
    ],
)
def test_bad_tsv_rows_raise_data_error_naming_file_and_line(tmp_path, content, message):
    data_dir = _stage(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_split("sst2", "eval", data_dir)
    assert str(info.value).startswith(str(data_dir / "sst2" / "dev.tsv"))


def test_missing_file_names_the_path_and_the_task(tmp_path):
    data_dir = _stage(tmp_path, None)
    with pytest.raises(DataError, match="task 'sst2': no data file .*sst2/dev.tsv"):
        load_split("sst2", "eval", data_dir)


def test_unknown_split_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="no split 'validation'; use one of \\['train', 'eval'\\]"):
        load_split("sst2", "validation", _stage(tmp_path, GOOD))


def test_labels_txt_mismatch_is_reported(tmp_path):
    data_dir = _stage(tmp_path, GOOD, labels="negative\nneutral\npositive\n")
    with pytest.raises(DataError, match="labels.txt: lists 3 labels .* task 'sst2' has 2"):
        load_split("sst2", "eval", data_dir)
    (data_dir / "sst2" / "labels.txt").unlink()
    with pytest.raises(DataError, match="label file .*labels.txt does not exist"):
        label_names("sst2", data_dir)


def test_parquet_files_load_like_tsv(tmp_path):
    data_dir = _stage(tmp_path, None)
    rows = {"sentence": ["a fine film .", "a dull one ."], "label": [1, 0]}
    datasets.Dataset.from_dict(rows).to_parquet(str(data_dir / "sst2" / "dev.parquet"))
    examples = load_split("sst2", "eval", data_dir)
    assert [e.target for e in examples] == ["positive", "negative"]
    assert "Review: a fine film.\n" in examples[0].prompt


def test_bad_parquet_raises_data_error(tmp_path):
    data_dir = _stage(tmp_path, None)
    (data_dir / "sst2" / "dev.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="dev.parquet: cannot read as Parquet"):
        load_split("sst2", "eval", data_dir)
    rows = {"sentence": ["a film", "another"], "label": [1, 9]}
    datasets.Dataset.from_dict(rows).to_parquet(str(data_dir / "sst2" / "dev.parquet"))
    with pytest.raises(DataError, match="dev.parquet: row 2: label 9 is out of range"):
        load_split("sst2", "eval", data_dir)


def test_hub_columns_are_mapped_through_the_task():
    trec = get_task("trec")
    hub = datasets.Dataset.from_dict(
        {"text": ["Who was Galileo ?"], "coarse_label": [3], "fine_label": [29]}
    )
    (example,) = hub_examples(trec, hub, "hub CogComp/trec")
    assert example.target == "human" and "Question: Who was Galileo?\n" in example.prompt
    with pytest.raises(DataError, match="hub CogComp/trec: missing column 'coarse_label'"):
        hub_examples(trec, hub.remove_columns("coarse_label"), "hub CogComp/trec")


def test_task_is_a_frozen_dataclass():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("sst2").name = "other"  # type: ignore[misc]
    assert isinstance(get_task(get_task("cola")), Task)


def test_hub_loading_asks_for_the_task_dataset_and_maps_its_columns(monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, config, split):  # stands in for the network
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_dict({"sentence": ["a dull film ."], "label": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (example,) = load_split("sst2", "eval", hub=True)
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert example.target == "negative" and "Review: a dull film.\n" in example.prompt


def test_hub_failures_become_one_clear_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match="cannot load hub fancyzhx/ag_news split 'test': no network"
    ):
        load_split("agnews", "eval", hub=True)


def test_task_texts_are_the_train_inputs_without_instruction_or_label(tmp_path):
    data_dir = _stage(tmp_path, b"sentence\tlabel\na dev sentence never read .\t0\n")
    (data_dir / "sst2" / "train.tsv").write_bytes(
        b"sentence\tlabel\nit 's a fine film .\t1\na dull one .\t0\n"
    )
    texts = task_texts(["sst2"], data_dir)
    assert texts == ["it's a fine film.", "a dull one."]  # detokenised as in the prompt
    examples = load_split("sst2", "train", data_dir)
    assert all(e.text in e.prompt and e.target not in e.text for e in examples)
    (data_dir / "sst2" / "train.tsv").unlink()
    with pytest.raises(DataError, match="sst2/train.tsv"):
        task_texts(["sst2"], data_dir)  # the train split only: the dev file is not a fallback
