"""`data.format`: one raw row -> the text of one example, cut into segments that are
either context (no loss) or reply (loss).

    text               the whole of row[text_field] is reply
    prompt-completion  row[prompt_field] is context, row[completion_field] is reply
    alpaca             the Stanford Alpaca template around instruction/input; output is reply
    chat               row[messages_field] through the tokenizer's chat template; every
                       assistant turn is reply, everything else context

A row that lacks what its format needs is a bad row: `data.on_bad_rows: error` stops with
the count, the first few line numbers and the fix; `skip` drops and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lomotune.data.errors import DataError
from lomotune.data.sources import RawRows
from lomotune.recipe import DataConfig

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SHOW_BAD_ROWS = 5  # row numbers quoted in an error


@dataclass(frozen=True)
class Segment:
    text: str
    reply: bool  # True: the model is trained to produce it


@dataclass(frozen=True)
class Rendered:
    segments: tuple[Segment, ...]
    # Chat templates write their own start/end markers (and BOS where the model wants
    # one), so the pipeline adds neither BOS nor EOS around a templated example.
    templated: bool = False
    # (prompt, answer) for exact-match generation; single-turn formats only.
    eval_pair: tuple[str, str] | None = None


@dataclass
class BadRows:
    count: int = 0
    examples: list[tuple[int, str]] | None = None  # (row number, reason), the first few


class BadRow(Exception):
    """Raised by a renderer: the row cannot become an example (the reason says why)."""


def render_rows(raw: RawRows, cfg: DataConfig, tokenizer: Any) -> tuple[list[Rendered], BadRows]:
    """Render every row; bad rows raise DataError or are skipped, as data.on_bad_rows says."""
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.format: chat needs the tokenizer's chat template, and this model's "
            "tokenizer has none. Use data.format: prompt-completion (one prompt and one "
            "completion field per row), or a model that ships a chat template (an "
            "-Instruct or -Chat model)"
        )
    render = RENDERERS[cfg.format]
    out: list[Rendered] = []
    bad = BadRows(0, [])
    for row in raw.rows:
        try:
            if row.data is None:
                raise BadRow(row.problem or "unreadable")
            out.append(render(row.data, cfg, tokenizer))
        except BadRow as e:
            bad.count += 1
            if len(bad.examples) < SHOW_BAD_ROWS:
                bad.examples.append((row.number, str(e)))
    if bad.count and cfg.on_bad_rows == "error":
        raise DataError(bad_rows_message(raw, cfg, bad))
    return out, bad


def bad_rows_message(raw: RawRows, cfg: DataConfig, bad: BadRows) -> str:
    shown = "; ".join(f"{raw.unit} {n}: {why}" for n, why in bad.examples)
    more = f" (first {len(bad.examples)} shown)" if bad.count > len(bad.examples) else ""
    lines = [
        f"{raw.origin}: {bad.count} of {len(raw.rows)} rows cannot be used with "
        f"data.format: {cfg.format}: {shown}{more}."
    ]
    columns = raw.columns()
    if bad.count == len(raw.rows) and columns:
        # Every row bad usually means the field names are wrong, not the rows.
        lines.append(
            f"The rows have the fields {', '.join(columns)}: set data.{_field_keys(cfg.format)} "
            "to the right names, or choose another data.format."
        )
    lines.append("Fix those rows, or set data.on_bad_rows: skip to drop them.")
    return " ".join(lines)


def _field_keys(fmt: str) -> str:
    return {
        "text": "text_field",
        "prompt-completion": "prompt_field / data.completion_field",
        "alpaca": "format (alpaca needs instruction and output)",
        "chat": "messages_field",
    }[fmt]


def _text(row: dict[str, Any], field: str, *, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow(f"no field {field!r}")
    value = row[field]
    # Numbers are text of their own (a label 1, an answer 122); anything else is a mistake.
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRow(f"field {field!r} is a {type(value).__name__}, not text")
    if not value and not allow_empty:
        raise BadRow(f"field {field!r} is empty")
    return value


def render_text(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> Rendered:
    return Rendered((Segment(_text(row, cfg.text_field), True),))


def render_prompt_completion(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> Rendered:
    prompt = _text(row, cfg.prompt_field, allow_empty=True)
    answer = _text(row, cfg.completion_field)
    return Rendered((Segment(prompt, False), Segment(answer, True)), eval_pair=(prompt, answer))


def render_alpaca(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> Rendered:
    instruction = _text(row, "instruction")
    answer = _text(row, "output")
    extra = row.get("input")
    extra = "" if extra is None else _text(row, "input", allow_empty=True)
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return Rendered((Segment(prompt, False), Segment(answer, True)), eval_pair=(prompt, answer))


def render_chat(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> Rendered:
    messages = row.get(cfg.messages_field)
    if messages is None:
        raise BadRow(f"no field {cfg.messages_field!r}")
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"field {cfg.messages_field!r} is not a non-empty list of messages")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise BadRow(f"message {i + 1} is not {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message: nothing to learn")

    def rendered(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # the template raises its own errors (roles must alternate, ...)
            raise BadRow(f"the chat template refused it: {e}") from None

    # Render the conversation up to each assistant turn with the generation prompt: what
    # the model sees before it replies. The reply is what the next rendering adds. This
    # relies on earlier turns rendering the same once later ones exist; a template that
    # rewrites them (some drop earlier reasoning) cannot be masked this way.
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = rendered(messages[:i], True)
        through = rendered(messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise _unstable_template()
        segments += [Segment(before[len(done) :], False), Segment(through[len(before) :], True)]
        done = through
    full = rendered(messages, False)
    if not full.startswith(done):
        raise _unstable_template()
    segments.append(Segment(full[len(done) :], False))
    return Rendered(tuple(s for s in segments if s.text), templated=True)


def _unstable_template() -> DataError:
    return DataError(
        "data.format: chat: this tokenizer's chat template renders earlier turns "
        "differently once later turns are added, so the assistant replies cannot be "
        "located in the text. Use data.format: prompt-completion with the conversation "
        "rendered into prompt and completion fields, or a model with a simpler template"
    )


RENDERERS = {
    "text": render_text,
    "prompt-completion": render_prompt_completion,
    "alpaca": render_alpaca,
    "chat": render_chat,
}
