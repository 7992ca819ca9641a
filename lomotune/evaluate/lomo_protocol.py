"""`--protocol lomo`: SuperGLUE as the LOMO paper evaluated it (arXiv 2306.09782, Table 3),
re-written from its repository (OpenLMLab/LOMO, `lomo/src/mydatasets.py`, `prompts.py`,
`utils.py` EvalDataCollatorForCauselLM, `lomo_trainer.py` eval_step), whose prompts are
MeZO's (arXiv 2305.17333, Appendix E).

What the code does, and so what this does:
- prompt: the task's question parts, each followed by "\\n", then "Answer: " (COPA: the
  premise with " so "/" because " and no "Answer: "); the answer is the choice text;
- tokens: source + answer tokenized whole, then the end-of-sequence token; the labels
  start at the *last* source token (`labels[:len(source_tokens) - 1] = -100`), so the
  scored tokens are that token, the answer and EOS;
- choice: the smallest cross-entropy averaged over the padded batch width, which is the
  same for every choice in a batch: the largest *summed* log-likelihood of the scored
  tokens (`acc`). MeZO's own code averages per scored token instead; that is reported as
  `acc_per_token`;
- examples: 1000 sampled from the validation split with `random.seed(0)` and
  `random.sample(range(n), 1000)` where the split has more (the repository's
  REPRODUCIBILITY_SEED is 0; 42 is its training seed);
- CB is not among LOMO's tasks (its entry is commented out); it is scored here with the
  MeZO prompt that the commented-out entry holds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lomotune.evaluate.metrics import Scores, argmax, mean, mean_stderr
from lomotune.evaluate.run import TaskResult
from lomotune.evaluate.scoring import TokenPair, loglikelihoods
from lomotune.evaluate.task import Task

SAMPLE_SIZE = 1000
SAMPLE_SEED = 0  # mydatasets.py REPRODUCIBILITY_SEED


@dataclass(frozen=True)
class Prompt:
    parts: Callable[[dict], list[str]]  # the question parts, each printed on its line
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    answer_cue: bool = True  # "Answer: " after the parts (all but COPA)


def _record_choices(doc: dict) -> list[str]:
    # Gold answers after the first are removed from the entities (record_clean_choices).
    return [e for e in doc["entities"] if e not in doc["answers"][1:]]


PROMPTS: dict[str, Prompt] = {
    "boolq": Prompt(
        lambda d: [f"{d['passage']} {d['question']}"], lambda d: ["No", "Yes"], lambda d: d["label"]
    ),
    "cb": Prompt(
        lambda d: [
            f'Suppose {d["premise"]} Can we infer that "{d["hypothesis"]}"? Yes, No, or Maybe?'
        ],
        lambda d: ["Yes", "No", "Maybe"],
        lambda d: d["label"],
    ),
    "multirc": Prompt(
        lambda d: [
            d["paragraph"],
            f"Question: {d['question']}",
            f'I found this answer "{d["answer"]}". Is that correct? Yes or No?',
        ],
        lambda d: ["No", "Yes"],
        lambda d: d["label"],
    ),
    "rte": Prompt(
        lambda d: [f'{d["premise"]}\nDoes this mean that "{d["hypothesis"]}" is true? Yes or No?'],
        lambda d: ["Yes", "No"],
        lambda d: d["label"],
    ),
    "wic": Prompt(
        lambda d: [
            f'Does the word "{d["word"]}" have the same meaning in these two sentences? '
            f"Yes, No?\n{d['sentence1']}\n{d['sentence2']}"
        ],
        lambda d: ["No", "Yes"],
        lambda d: d["label"],
    ),
    "wsc": Prompt(
        # "pronuon" is in the original prompt; kept, to score what it scored.
        lambda d: [
            f'{d["text"]}\nIn the previous sentence, does the pronuon "{d["span2_text"]}" '
            f'refer to "{d["span1_text"]}"? Yes or No?'
        ],
        lambda d: ["No", "Yes"],
        lambda d: d["label"],
    ),
    "copa": Prompt(
        lambda d: [f"{d['premise']} {'so' if d['question'] == 'effect' else 'because'} "],
        lambda d: [d["choice1"], d["choice2"]],
        lambda d: d["label"],
        answer_cue=False,
    ),
    "record": Prompt(
        lambda d: [
            d["passage"].replace("@highlight\n", "- ")
            + f'\n{d["query"]}\nQuestion: What is the "@placeholder"?'
        ],
        _record_choices,
        lambda d: _record_choices(d).index(d["answers"][0]),
    ),
}


def source(prompt: Prompt, doc: dict) -> str:
    text = "".join(f"{part}\n" for part in prompt.parts(doc))
    # COPA uses the repository's "natural" prompt: the same text, newlines stripped.
    return text + "Answer: " if prompt.answer_cue else text.strip("\n")


def sample(docs: list[dict]) -> list[dict]:
    """The repository's evaluation sample: 1000 docs drawn with seed 0, in drawn order."""
    if len(docs) <= SAMPLE_SIZE:
        return docs
    rng = random.Random(SAMPLE_SEED)
    return [docs[i] for i in rng.sample(range(len(docs)), SAMPLE_SIZE)]


def encode(tokenizer, source_text: str, answer: str, max_length: int) -> TokenPair:
    """(context, scored tokens) as the repository's _tokenize_fn: the scored tokens are
    the last source token, the answer's and EOS."""
    whole = tokenizer(source_text + answer)["input_ids"][:max_length] + [tokenizer.eos_token_id]
    start = len(tokenizer(source_text)["input_ids"]) - 1
    return whole[:start], whole[start:]


def evaluate_lomo(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    docs: list[dict],
    *,
    source_name: str,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> TaskResult:
    started = time.perf_counter()
    prompt = PROMPTS[task.name]
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    pairs, owners = [], []
    for i, doc in enumerate(docs):
        text = source(prompt, doc)
        for answer in prompt.choices(doc):
            pairs.append(encode(tokenizer, text, answer, max_length))
            owners.append(i)
    flat = loglikelihoods(
        model, pairs, batch_size=batch_size, pad_id=tokenizer.pad_token_id, on_progress=on_progress
    )
    summed: list[list[float]] = [[] for _ in docs]
    per_token: list[list[float]] = [[] for _ in docs]
    for owner, (_, scored), ll in zip(owners, pairs, flat, strict=True):
        summed[owner].append(ll)
        per_token[owner].append(ll / len(scored))
    acc, acc_per_token, predictions = [], [], []
    for doc, sums, averages in zip(docs, summed, per_token, strict=True):
        gold = prompt.gold(doc)
        acc.append(float(argmax(sums) == gold))
        acc_per_token.append(float(argmax(averages) == gold))
        predictions.append(
            {"idx": doc["idx"], "prediction": argmax(sums), "gold": gold, "loglikelihoods": sums}
        )
    scores = Scores(
        {"acc": mean(acc), "acc_per_token": mean(acc_per_token)},
        {"acc": mean_stderr(acc), "acc_per_token": mean_stderr(acc_per_token)},
        predictions,
    )
    return TaskResult(task.name, source_name, len(docs), scores, time.perf_counter() - started)
