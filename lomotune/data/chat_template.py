"""`data.chat_template`: a chat template for a tokenizer that has none (a base model) or
another one, given as a Jinja template string or the path of a file holding one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lomotune.data.errors import DataError
from lomotune.recipe import DataConfig


def apply_chat_template(tokenizer: Any, cfg: DataConfig) -> None:
    """Set the tokenizer's chat template from `cfg.chat_template` (None: leave it). The
    final model's tokenizer is saved with it, so the trained model keeps the template."""
    if cfg.chat_template is None:
        return
    tokenizer.chat_template = read_chat_template(cfg.chat_template)


def read_chat_template(value: str) -> str:
    """The template text: the file's contents where `value` names a file, else `value`
    itself when it is Jinja (holds `{{` or `{%`); parsed here, so that a broken template
    is one message before any row is rendered."""
    import jinja2

    path = Path(value).expanduser()
    try:
        is_file = "{" not in value and path.is_file()  # a template holds {{ or {%
    except OSError:  # a name too long for a file, ...
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.chat_template: cannot read {path}: {e}") from None
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise DataError(
            f"data.chat_template: {value!r} is neither a file nor a Jinja template (it holds "
            "no {{ or {%). Give the template itself, or the path of a file holding it"
        )
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        where = f"{path}, " if is_file else ""
        raise DataError(
            f"data.chat_template: not a valid Jinja template ({where}line {e.lineno}: {e.message})"
        ) from None
    return text
