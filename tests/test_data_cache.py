"""The tokenized-data cache: hit on the same inputs, miss on any change."""

import json
import os

from lomotune.data import prepare_data
from lomotune.recipe import DataConfig
from lomotune.testing import tiny_tokenizer


def write_rows(path, n, completion=" yes"):
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": completion}) + "\n" for i in range(n))
    )


def test_second_prepare_comes_from_the_cache_and_equals_the_first(tmp_path, private_data_cache):
    src = tmp_path / "d.jsonl"
    write_rows(src, 30)
    cfg = DataConfig(source=str(src))
    tok = tiny_tokenizer()
    first = prepare_data(cfg, tok, seed=1)
    second = prepare_data(cfg, tok, seed=1)
    assert not first.stats.from_cache and second.stats.from_cache
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]
    assert [e.labels for e in second.eval] == [e.labels for e in first.eval]
    assert second.eval_pairs == first.eval_pairs
    assert len(list(private_data_cache.glob("data/*.json"))) == 1


def test_any_change_misses(tmp_path):
    src = tmp_path / "d.jsonl"
    write_rows(src, 30)
    tok = tiny_tokenizer()
    prepare_data(DataConfig(source=str(src)), tok, seed=1)
    assert not prepare_data(DataConfig(source=str(src)), tok, seed=2).stats.from_cache  # seed
    assert not prepare_data(DataConfig(source=str(src), max_length=9), tok, seed=1).stats.from_cache
    tok2 = tiny_tokenizer(chat_template=False)
    assert not prepare_data(DataConfig(source=str(src)), tok2, seed=1).stats.from_cache
    write_rows(src, 30, completion=" no")  # the file changed
    os.utime(src, ns=(1, 1))
    changed = prepare_data(DataConfig(source=str(src)), tok, seed=1)
    assert not changed.stats.from_cache
    assert changed.eval_pairs[0][1] == " no"
