"""SuperGLUE readers (official and hub layouts) and the harness's prompts, against
hand-written fixtures and hand-written expected strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lomotune.evaluate.reading import read_split
from lomotune.evaluate.superglue import TASKS, select_tasks
from lomotune.evaluate.task import EvalDataError

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
REAL = Path(__file__).resolve().parents[2] / "shared" / "superglue"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_official_and_hub_layouts_give_the_same_docs(name):
    task = TASKS[name]
    official, official_source = read_split(task, "val", FIXTURES / "official")
    hub, hub_source = read_split(task, "val", FIXTURES / "hub")
    assert official_source.endswith(f"{task.official_folder}/val.jsonl")
    assert hub_source.endswith(f"{task.hub_config}/validation.jsonl")
    assert len(official) >= 2
    assert official == hub


def test_nested_layouts_are_flattened():
    multirc, _ = read_split(TASKS["multirc"], "val", FIXTURES / "official")
    assert [(d["answer"], d["label"]) for d in multirc] == [
        ("Two", 1),
        ("One", 0),
        ("2", 1),
        ("Ben", 1),
        ("Carl", 0),
    ]
    assert multirc[3]["idx"] == {"paragraph": 0, "question": 1, "answer": 3}
    record, _ = read_split(TASKS["record"], "val", FIXTURES / "official")
    # Entities are character spans with an inclusive end; sorted and de-duplicated.
    assert record[0]["entities"] == ["London", "Paris"]
    assert record[0]["answers"] == ["Paris"]
    assert record[1]["answers"] == ["London"]
    cb, _ = read_split(TASKS["cb"], "val", FIXTURES / "official")
    assert [d["label"] for d in cb] == [0, 1, 2]


def docs(name):
    return read_split(TASKS[name], "val", FIXTURES / "official")[0]


def test_prompts_are_the_harness_prompts():
    boolq = docs("boolq")[0]
    assert TASKS["boolq"].context(boolq) == (
        "The Sun is the star at the center of the Solar System.\n"
        "Question: is the sun a star?\nAnswer:"
    )
    assert TASKS["boolq"].choices(boolq) == ["no", "yes"]
    assert TASKS["boolq"].gold(boolq) == 1
    cb = docs("cb")[1]
    assert TASKS["cb"].context(cb) == (
        "He never said he was leaving.\n"
        "Question: he said he was leaving. True, False, or Neither?\nAnswer:"
    )
    assert TASKS["cb"].choices(cb)[TASKS["cb"].gold(cb)] == "False"
    copa = docs("copa")
    assert TASKS["copa"].context(copa[0]) == "The man broke his toe because"
    assert TASKS["copa"].context(copa[1]) == "I tipped the bottle therefore"
    assert TASKS["copa"].choices(copa[1]) == [
        " the liquid in the bottle froze.",
        " the liquid in the bottle poured out.",
    ]
    rte = docs("rte")[1]
    assert TASKS["rte"].context(rte) == (
        "No rain fell in May.\nQuestion: It rained in May. True or False?\nAnswer:"
    )
    assert TASKS["rte"].choices(rte)[TASKS["rte"].gold(rte)] == "False"
    wic = docs("wic")[0]
    assert TASKS["wic"].context(wic) == (
        "Sentence 1: She sat on the river bank.\nSentence 2: He robbed the bank.\n"
        "Question: Is the word 'bank' used in the same way in the two sentences above?\n"
        "Answer:"
    )
    wsc = docs("wsc")
    assert TASKS["wsc"].context(wsc[0]) == (
        "Passage: Mark told Pete many lies about himself, which Pete included in his book. "
        "*He* should have been more skeptical.\n"
        'Question: In the passage above, does the pronoun "*He*" refer to "*Pete*"?\nAnswer:'
    )
    assert (
        TASKS["wsc"]
        .context(wsc[1])
        .startswith("Passage: The trophy doesn't fit into the suitcase because *it* is too big.\n")
    )


def test_multirc_yes_is_right_for_a_correct_answer():
    two, one = docs("multirc")[:2]
    task = TASKS["multirc"]
    assert task.context(two) == (
        "Anna bought two apples. She gave one to Ben.\n"
        "Question: How many apples did Anna buy?\nAnswer:"
    )
    assert task.choices(two) == [
        "Two\nIs the answer correct? yes",
        "Two\nIs the answer correct? no",
    ]
    assert task.choices(two)[task.gold(two)].endswith("yes")  # label 1: a correct answer
    assert task.choices(one)[task.gold(one)].endswith("no")


def test_record_prompt_and_choices():
    doc = docs("record")[1]
    task = TASKS["record"]
    assert task.context(doc) == (
        "Paris hosted the Games. London watched.\n\n  - Paris won the bid.\n  - London lost.\n"
    )
    assert task.choices(doc) == ["  - Fans in London were sad", "  - Fans in Paris were sad"]
    assert task.gold(doc) == 0


def test_select_tasks():
    assert [t.name for t in select_tasks("superglue")] == list(TASKS)
    assert [t.name for t in select_tasks("RTE, cb")] == ["rte", "cb"]
    with pytest.raises(EvalDataError, match="unknown task glue"):
        select_tasks("rte,glue")


def test_a_malformed_line_names_file_and_line(tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    good = (FIXTURES / "official" / "RTE" / "val.jsonl").read_text().splitlines()[0]
    bad = json.dumps({"premise": "p", "label": "entailment", "idx": 3})
    (folder / "val.jsonl").write_text(f"{good}\n{bad}\n")
    with pytest.raises(EvalDataError, match=r"RTE/val.jsonl line 2: missing field 'hypothesis'"):
        read_split(TASKS["rte"], "val", tmp_path)
    (folder / "val.jsonl").write_text(f"{good}\n{{not json\n")
    with pytest.raises(EvalDataError, match=r"val.jsonl line 2: not valid JSON"):
        read_split(TASKS["rte"], "val", tmp_path)
    (folder / "val.jsonl").write_text(good.replace('"entailment"', '"maybe"') + "\n")
    with pytest.raises(EvalDataError, match=r"line 1: label 'maybe' is not one of"):
        read_split(TASKS["rte"], "val", tmp_path)


def test_missing_task_folder_and_split(tmp_path):
    with pytest.raises(EvalDataError, match=r"no folder for boolq .*BoolQ .*boolq \(hub layout\)"):
        read_split(TASKS["boolq"], "val", tmp_path)
    with pytest.raises(EvalDataError, match=r"test.jsonl does not exist \(rte has val.jsonl\)"):
        read_split(TASKS["rte"], "test", FIXTURES / "official")


def test_a_test_split_without_labels_is_refused(tmp_path):
    (tmp_path / "BoolQ").mkdir()
    line = {"question": "q", "passage": "p", "idx": 0}
    (tmp_path / "BoolQ" / "test.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(EvalDataError, match="line 1: missing field 'label' \\(a test split"):
        read_split(TASKS["boolq"], "test", tmp_path)


REAL_LINES = {  # task: (split, docs): lines, or answers (MultiRC)
    "cb": ("val", 56),
    "rte": ("val", 277),
    "copa": ("train", 400),
    "wic": ("train", 5428),
    "wsc": ("train", 554),
}


@pytest.mark.skipif(not REAL.is_dir(), reason="no ../shared/superglue beside the checkout")
@pytest.mark.parametrize("name", sorted(REAL_LINES))
def test_real_files_read_completely(name):
    split, expected = REAL_LINES[name]
    read, _ = read_split(TASKS[name], split, REAL)
    assert len(read) == expected
    for doc in read:  # every prompt can be formed
        assert TASKS[name].context(doc) and TASKS[name].choices(doc)[TASKS[name].gold(doc)]


@pytest.mark.skipif(not REAL.is_dir(), reason="no ../shared/superglue beside the checkout")
def test_real_multirc_has_one_doc_per_answer():
    lines = (REAL / "MultiRC" / "val.jsonl").read_text().splitlines()
    answers = sum(
        len(q["answers"]) for line in lines for q in json.loads(line)["passage"]["questions"]
    )
    read, _ = read_split(TASKS["multirc"], "val", REAL)
    assert len(read) == answers


def test_fewshot_prefixes_are_solved_examples_never_the_doc_itself():
    from lomotune.evaluate.run import fewshot_prefixes

    task = TASKS["cb"]
    pool = docs("cb")
    prefixes = fewshot_prefixes(task, pool, pool, 2, same_split=True)
    solved = {
        d["idx"]: task.context(d) + " " + ["True", "False", "Neither"][d["label"]] + "\n\n"
        for d in pool
    }
    for doc, prefix in zip(pool, prefixes, strict=True):
        others = [text for idx, text in solved.items() if idx != doc["idx"]]
        assert prefix in (others[0] + others[1], others[1] + others[0])
    assert fewshot_prefixes(task, pool, pool, 0, same_split=True) == ["", "", ""]
