"""The data pipeline with the tiny character tokenizer: one character is one token, so
every length below is a count of characters (+1 for EOS; this tokenizer adds no BOS)."""

from __future__ import annotations

import csv
import datetime
import json
import re
from itertools import islice
from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from lomotune.data import BatchLoader, DataError, TokenizedExample, prepare_data
from lomotune.data.builtin import arithmetic, dates
from lomotune.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from lomotune.data.pipeline import IGNORE
from lomotune.data.sources import read_source
from lomotune.recipe import DataConfig
from lomotune.testing import tiny_llama, tiny_tokenizer

TOK = tiny_tokenizer()
EOS = TOK.eos_token_id


def cfg(source: str | Path, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(source=str(source), **kw)


def write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def reply_text(example: TokenizedExample) -> str:
    """The tokens that carry a loss, decoded (EOS shown as </s>)."""
    return TOK.decode([t for t in example.labels if t != IGNORE])


PC_ROWS = [{"prompt": f"Q{i}:", "completion": f" a{i}"} for i in range(10)]


# ---------------------------------------------------------------------------------------
# Masking, truncation, dropping


def test_prompt_is_masked_answer_and_eos_are_labels(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "completion": " ab"}])
    data = prepare_data(cfg(src), TOK, seed=0)
    (ex,) = data.train
    assert ex.input_ids == ids("Q: ab") + [EOS]
    assert ex.labels == [IGNORE, IGNORE] + ids(" ab") + [EOS]
    assert data.stats.train_loss_tokens == 4 and data.stats.train_tokens == 6
    assert data.eval == [] and data.stats.eval_examples == 0


def test_train_on_prompt_labels_everything_but_the_first_token(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "completion": " ab"}])
    (ex,) = prepare_data(cfg(src, train_on_prompt=True), TOK, seed=0).train
    assert ex.labels == [IGNORE] + ex.input_ids[1:]


def test_bos_is_added_when_the_tokenizer_adds_it_by_default(tmp_path):
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "completion": " a"}])
    data = prepare_data(cfg(src), tok, seed=0)
    assert data.add_bos
    assert data.train[0].input_ids == [tok.bos_token_id] + ids("Q: a") + [EOS]
    assert data.train[0].labels == [IGNORE, IGNORE, IGNORE] + ids(" a") + [EOS]


def test_truncation_counts_and_drops_examples_whose_answer_is_cut_off(tmp_path):
    rows = [
        {"prompt": "P:", "completion": " abc"},  # 7 tokens: fits in 8
        {"prompt": "Prompt:", "completion": " abcdef"},  # 15: cut to 8, 1 answer token left
        {"prompt": "A long prompt", "completion": " x"},  # 16: prompt fills 8, dropped
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(cfg(src, max_length=8), TOK, seed=0)
    s = data.stats
    assert (s.truncated, s.dropped, s.train_examples) == (2, 1, 2)
    assert s.longest_before_truncation == 16 and s.max_length == 8
    kept = sorted(data.train, key=len)
    assert kept[1].input_ids == ids("Prompt: ")
    assert reply_text(kept[1]) == " " and kept[1].num_loss_tokens == 1


def test_every_example_dropped_is_an_error_naming_max_length(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 30, "completion": " y"}] * 3)
    with pytest.raises(DataError, match=r"max_length 10 .*longest example 33 tokens"):
        prepare_data(cfg(src, max_length=10), TOK, seed=0)


# ---------------------------------------------------------------------------------------
# Formats


def test_text_format_trains_on_everything(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello"}])
    (ex,) = prepare_data(cfg(src, format="text", text_field="body"), TOK, seed=0).train
    assert ex.input_ids == ids("hello") + [EOS]
    assert ex.labels == [IGNORE] + ids("ello") + [EOS]
    assert prepare_data(cfg(src, format="text", text_field="body"), TOK, 0).eval_pairs == []


def test_field_mapping_for_prompt_completion(tmp_path):
    rows = [{"q": f"question {i}", "a": f" {i}"} for i in range(4)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(
        cfg(src, prompt_field="q", completion_field="a", eval_fraction=0.5), TOK, seed=1
    )
    assert len(data.train) == 2 and len(data.eval) == 2
    for prompt, answer in data.eval_pairs:
        assert prompt == f"question {answer.strip()}"


def test_alpaca_uses_the_standard_template_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 2", "output": "4"},
        {"instruction": "Greet.", "output": "hi"},
        {"instruction": "Greet.", "input": "", "output": "hey"},
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(cfg(src, format="alpaca"), TOK, seed=0)
    texts = {reply_text(e): TOK.decode(e.input_ids) for e in data.train}
    assert texts == {
        "4</s>": ALPACA_WITH_INPUT.format(instruction="Add.", input="2 2") + "4</s>",
        "hi</s>": ALPACA_NO_INPUT.format(instruction="Greet.") + "hi</s>",
        "hey</s>": ALPACA_NO_INPUT.format(instruction="Greet.") + "hey</s>",
    }
    assert texts["4</s>"].startswith(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n"
    )


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]


def test_chat_trains_on_assistant_turns_only(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    data = prepare_data(cfg(src, format="chat"), TOK, seed=0)
    (ex,) = data.train
    full = TOK.apply_chat_template(CHAT, tokenize=False)
    assert TOK.decode(ex.input_ids) == full  # no BOS/EOS added around a template
    # Trained: each reply with its end-of-turn marker, so the model learns to stop.
    assert reply_text(ex) == "yo<|im_end|>\nciao<|im_end|>\n"
    first = full.index("yo")
    prefix_tokens = len(ids(full[:first]))
    assert all(y == IGNORE for y in ex.labels[:prefix_tokens])
    assert ex.labels[prefix_tokens : prefix_tokens + 2] == ids("yo")
    assert data.eval_pairs == []


def test_chat_without_a_template_is_an_error_with_the_fix(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"chat template.*prompt-completion"):
        prepare_data(cfg(src, format="chat"), tiny_tokenizer(chat_template=False), seed=0)


def test_chat_rows_without_an_assistant_turn_are_bad_rows(tmp_path):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}, {"messages": "hello"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"2 of 3 rows.*line 2: no assistant message.*line 3"):
        prepare_data(cfg(src, format="chat"), TOK, seed=0)


# ---------------------------------------------------------------------------------------
# Sources


def expected_pairs() -> set[tuple[str, str]]:
    return {(r["prompt"], r["completion"]) for r in PC_ROWS}


def read_pairs(path: Path) -> set[tuple[str, str]]:
    data = prepare_data(cfg(path, eval_fraction=0.3), TOK, seed=0)
    assert (len(data.train), len(data.eval)) == (7, 3)
    train = {TOK.decode(e.input_ids) for e in data.train}
    return {(p, a) for p, a in data.eval_pairs} | {
        (t.split(" ")[0], " " + t.split(" ")[1].removesuffix("</s>")) for t in train
    }


def test_jsonl_source(tmp_path):
    assert read_pairs(write_jsonl(tmp_path / "d.jsonl", PC_ROWS)) == expected_pairs()


@pytest.mark.parametrize("layout", ["list", "data-key", "columns", "lines"])
def test_json_source_layouts(tmp_path, layout):
    path = tmp_path / "d.json"
    if layout == "list":
        path.write_text(json.dumps(PC_ROWS))
    elif layout == "data-key":
        path.write_text(json.dumps({"version": 1, "data": PC_ROWS}))
    elif layout == "columns":
        path.write_text(json.dumps({k: [r[k] for r in PC_ROWS] for k in ("prompt", "completion")}))
    else:  # datasets' to_json writes one object per line into a .json file
        write_jsonl(path, PC_ROWS)
    assert read_pairs(path) == expected_pairs()


def test_csv_source_keeps_values_as_text(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(PC_ROWS)
    assert read_pairs(path) == expected_pairs()
    num = tmp_path / "n.csv"
    num.write_text('prompt,completion\n"What is 1 + 1?\nAnswer:", 02\n')
    raw = read_source(str(num), num_examples=1, seed=0)
    assert raw.rows[0].data == {"prompt": "What is 1 + 1?\nAnswer:", "completion": " 02"}


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(PC_ROWS), path)
    assert read_pairs(path) == expected_pairs()


def test_eval_split_is_a_second_file_next_to_a_local_source(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PC_ROWS)
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "V:", "completion": " v"}])
    data = prepare_data(cfg(tmp_path / "train.jsonl", eval_split="val.jsonl"), TOK, seed=0)
    assert len(data.train) == 10 and data.eval_pairs == [("V:", " v")]
    assert data.stats.rows_read == 11


def test_hub_source_reads_the_named_splits(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if split == "nope":
            raise ValueError("Unknown split \"nope\". Should be one of ['train', 'test'].")
        rows = PC_ROWS if split == "train" else PC_ROWS[:2]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = prepare_data(cfg("hub:org/name", eval_split="test"), TOK, seed=0)
    assert calls == [("org/name", "train"), ("org/name", "test")]
    assert (len(data.train), len(data.eval)) == (10, 2)
    with pytest.raises(DataError, match=r"hub:org/name \(split nope\).*Unknown split"):
        prepare_data(cfg("hub:org/name", split="nope"), TOK, seed=0)


def test_missing_unknown_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare_data(cfg(tmp_path / "nope.jsonl"), TOK, seed=0)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'.*\.jsonl"):
        prepare_data(cfg(tmp_path / "d.txt"), TOK, seed=0)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        prepare_data(cfg(tmp_path / "e.jsonl"), TOK, seed=0)
    (tmp_path / "e.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match="has no rows"):
        prepare_data(cfg(tmp_path / "e.csv"), TOK, seed=0)
    (tmp_path / "bad.json").write_text('[{"prompt": "a",}]')
    with pytest.raises(DataError, match="not valid JSON.*line 1"):
        prepare_data(cfg(tmp_path / "bad.json"), TOK, seed=0)
    with pytest.raises(DataError, match=r"no built-in dataset 'nope'.*builtin:dates"):
        prepare_data(cfg("builtin:nope"), TOK, seed=0)


# ---------------------------------------------------------------------------------------
# Bad rows


def test_bad_rows_error_names_count_lines_field_and_fix(tmp_path):
    rows = [dict(r) for r in PC_ROWS]
    del rows[2]["completion"]  # line 3
    rows[5]["completion"] = ""  # line 7: a blank line is inserted before it
    src = write_jsonl(tmp_path / "d.jsonl", rows, blank_after=4)
    with open(src, "a") as f:
        f.write("{not json\n")  # line 12
    with pytest.raises(DataError) as err:
        prepare_data(cfg(src), TOK, seed=0)
    msg = str(err.value)
    assert "3 of 11 rows" in msg
    assert "line 3: no field 'completion'" in msg
    assert "line 7: field 'completion' is empty" in msg
    assert "line 12: not valid JSON" in msg
    assert "data.on_bad_rows: skip" in msg

    data = prepare_data(cfg(src, on_bad_rows="skip"), TOK, seed=0)
    assert data.stats.bad_rows_skipped == 3 and len(data.train) == 8
    assert [n for n, _ in data.bad_row_examples] == [3, 7, 12]


def test_bad_csv_rows_report_their_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\na,b\n"two\nlines",c\nonly-one-field\nd,e\n')
    with pytest.raises(DataError, match=r"1 of 4 rows.*line 5: 1 fields where the header has 2"):
        prepare_data(cfg(path), TOK, seed=0)


def test_all_rows_bad_suggests_the_field_names(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"fields question, answer: set data.prompt_field"):
        prepare_data(cfg(src), TOK, seed=0)
    with pytest.raises(DataError, match="every row .* was a bad row"):
        prepare_data(cfg(src, on_bad_rows="skip"), TOK, seed=0)


# ---------------------------------------------------------------------------------------
# Built-in datasets

DATE_PROMPT = re.compile(
    r"Rewrite the date (\d{4})-(\d\d)-(\d\d) in the form DD/MM/YYYY\.\nAnswer:"
)


def test_builtin_dates_are_correct_and_deterministic():
    rows = dates(500, seed=3)
    assert rows == dates(500, seed=3) and rows != dates(500, seed=4)
    assert len({r["prompt"] for r in rows}) == 500
    for r in rows:
        y, m, d = map(int, DATE_PROMPT.fullmatch(r["prompt"]).groups())
        assert 1900 <= y <= 2099
        day = datetime.date(y, m, d)  # raises on an invalid day
        assert r["completion"] == day.strftime(" %d/%m/%Y")
    assert rows[0]["completion"] == " 25/05/1985"  # pinned: the generator must not drift


def test_builtin_arithmetic_is_correct():
    rows = arithmetic(300, seed=0)
    for r in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?\nAnswer:", r["prompt"]).groups()
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert r["completion"] == f" {value}" and value >= 0


def test_builtin_source_through_prepare_data():
    c = DataConfig(source="builtin:dates", num_examples=40, eval_fraction=0.1)
    data = prepare_data(c, TOK, seed=42)
    assert (len(data.train), len(data.eval), len(data.eval_pairs)) == (36, 4, 4)
    again = prepare_data(c, TOK, seed=42)
    assert [e.input_ids for e in data.train] == [e.input_ids for e in again.train]
    train_prompts = {TOK.decode(e.input_ids).split("\nAnswer:")[0] for e in data.train}
    assert not {p.split("\nAnswer:")[0] for p, _ in data.eval_pairs} & train_prompts
    for e in data.train:  # the answer is the 11 characters " DD/MM/YYYY", then EOS
        assert len(reply_text(e)) == len(" 14/03/2021</s>")
    with pytest.raises(DataError, match="eval_fraction"):
        prepare_data(c.model_copy(update={"eval_split": "test"}), TOK, seed=0)


# ---------------------------------------------------------------------------------------
# Loader


def synthetic(n: int, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 40, (), generator=g))
        prompt = length // 2
        input_ids = [10 + (i + k) % 90 for k in range(length)]
        out.append(TokenizedExample(input_ids, [IGNORE] * prompt + input_ids[prompt:]))
    return out


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [False, True])
def test_loader_is_deterministic_and_resumes_exactly(packing):
    examples = synthetic(45)
    make = lambda seed: BatchLoader(examples, 4, seed, 0, packing=packing, max_length=64)  # noqa: E731
    loader = make(7)
    n = loader.batches_per_epoch
    fresh = list(islice(loader.iterate(), 3 * n))
    assert [(e, i) for e, i, _ in fresh[n - 1 : n + 1]] == [(0, n - 1), (1, 0)]
    again = list(islice(make(7).iterate(), 3 * n))
    assert all(batches_equal(x[2], y[2]) for x, y in zip(fresh, again, strict=True))
    # Resume mid-epoch with a new loader: the same batches from there on.
    start = n + 2
    resumed = islice(make(7).iterate(start_epoch=1, start_index=2), 2 * n - 2)
    for (e, i, b), (e2, i2, b2) in zip(fresh[start:], resumed, strict=True):
        assert (e, i) == (e2, i2) and batches_equal(b, b2)
    # Epochs differ, and another seed differs.
    assert not batches_equal(loader.batch(0, 0), loader.batch(1, 0))
    assert not batches_equal(loader.batch(0, 0), make(8).batch(0, 0))


def test_each_example_once_per_epoch_and_batch_count():
    examples = synthetic(45)
    loader = BatchLoader(examples, 4, 0, 0)
    assert loader.batches_per_epoch == 12
    for epoch in range(2):
        seen = sorted(i for batch in loader.epoch_plan(epoch) for i in batch)
        assert seen == list(range(45))
    dropped = BatchLoader(examples, 4, 0, 0, drop_last=True)
    assert dropped.batches_per_epoch == 11
    assert all(len(b) == 4 for b in dropped.epoch_plan(0))
    with pytest.raises(DataError, match="batch_size 50"):
        BatchLoader(examples, 50, 0, 0, drop_last=True)


def test_padding_is_never_in_the_loss_and_bucketing_keeps_it_small():
    examples = synthetic(400)
    loader = BatchLoader(examples, 8, 0, pad_id=0)
    real = pad = loss = 0
    for batch in loader:
        mask = batch["attention_mask"]
        assert (batch["labels"][mask == 0] == IGNORE).all()
        assert (batch["input_ids"][mask == 0] == 0).all()
        assert (int(batch["num_tokens"]), int(batch["num_loss_tokens"])) == (
            int(mask.sum()),
            int((batch["labels"] != IGNORE).sum()),
        )
        real += int(mask.sum())
        pad += int((mask == 0).sum())
        loss += int(batch["num_loss_tokens"])
    assert real == sum(len(e) for e in examples)
    assert loss == sum(e.num_loss_tokens for e in examples)
    # Lengths 4..39 at random: unbucketed batches of 8 would be ~40% padding.
    assert pad / (real + pad) < 0.05


def test_packing_restarts_positions_and_never_labels_across_a_boundary():
    examples = synthetic(30)
    for e in examples:
        e.labels[0] = e.input_ids[0]  # even if an example labels its first token
    loader = BatchLoader(examples, 2, 0, pad_id=0, packing=True, max_length=64)
    placed = sorted(i for row in loader.rows for i in row)
    assert placed == list(range(30))  # every example exactly once, never split
    tokens = 0
    for b, batch in enumerate(loader):
        assert "attention_mask" not in batch
        assert batch["input_ids"].shape[1] == 64
        for r, row in enumerate(loader.epoch_plan(0)[b]):
            at = 0
            for i in loader.rows[row]:
                e = examples[i]
                span = slice(at, at + len(e))
                assert batch["input_ids"][r, span].tolist() == e.input_ids
                assert batch["position_ids"][r, span].tolist() == list(range(len(e)))
                assert batch["labels"][r, at] == IGNORE
                assert batch["labels"][r, at + 1 : at + len(e)].tolist() == e.labels[1:]
                at += len(e)
            assert (batch["labels"][r, at:] == IGNORE).all()
            assert batch["position_ids"][r, at:].tolist() == list(range(64 - at))
        tokens += int(batch["num_tokens"])
    assert tokens == sum(len(e) for e in examples)


def test_packed_examples_do_not_see_each_other_in_a_llama():
    """The reason packed batches carry no attention_mask: transformers then separates the
    examples by position_ids, and each gets the logits it would get alone. Only with
    use_cache=False: a cache (the default) or a mask turns the separation off, silently."""
    model = tiny_llama().eval()
    examples = synthetic(6, seed=2)
    loader = BatchLoader(examples, 1, 0, pad_id=0, packing=True, max_length=128)
    batch = next(iter(loader))
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        packed = model(**inputs, use_cache=False).logits
        leaky = model(**inputs, attention_mask=torch.ones_like(batch["input_ids"])).logits
        at = 0
        for i in loader.rows[loader.epoch_plan(0)[0][0]]:
            alone = model(input_ids=torch.tensor([examples[i].input_ids])).logits
            n = len(examples[i])
            torch.testing.assert_close(packed[0, at : at + n], alone[0], atol=1e-5, rtol=1e-5)
            if at > 0:  # the second example on: the trap shows
                assert not torch.allclose(leaky[0, at : at + n], alone[0], atol=1e-3)
            at += n
    assert at > max(len(e) for e in examples)  # several examples really shared the row


def test_prepared_data_through_the_loader(tmp_path):
    data = prepare_data(DataConfig(source="builtin:arithmetic", num_examples=50), TOK, seed=0)
    loader = BatchLoader(data.train, 8, 0, data.pad_id)
    batch = loader.batch(0, 0)
    answers = batch["labels"].clone()
    answers[answers == IGNORE] = data.pad_id
    for row in answers:  # each row's loss tokens decode to " <number></s>"
        assert re.fullmatch(r" \d+</s>", TOK.decode([t for t in row.tolist() if t != data.pad_id]))


RTE = Path("/work/shared/superglue/RTE/train.jsonl")


@pytest.mark.skipif(not RTE.exists(), reason="SuperGLUE RTE files not present")
def test_real_rte_jsonl_with_field_mapping():
    c = cfg(RTE, prompt_field="premise", completion_field="label", max_length=4096)
    data = prepare_data(c, TOK, seed=0)
    assert data.stats.rows_read == data.stats.train_examples > 2000
    assert {reply_text(e) for e in data.train} == {"entailment</s>", "not_entailment</s>"}
