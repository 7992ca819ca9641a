"""Third-party messages a lomotune user cannot act on, silenced one by one: each by its
logger or warning category *and* its message, never a whole library's warnings.

What is here, and why the user cannot act on it:
- bitsandbytes (CPU with AVX512-BF16) logs, on import, that it could not fetch an
  optional kernel from the hub because its publisher is not trusted; lomotune never
  downloads code and runs bitsandbytes' own kernels instead.
- transformers 5 deprecates arguments that lomotune passes for transformers 4.56 to
  work too (`past_key_values` in eval's cached scoring) and calls it makes through peft
  (`is_gradient_checkpointing`); nothing in a recipe changes them.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> beginnings of the messages dropped from it
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    "transformers.utils.generic": ("`past_key_values`/`cache_params` are deprecated",),
}
# (category, regular expression matched at the start of the message)
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`past_key_values` is deprecated and will be removed"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed"),
)


class _DropMessages(logging.Filter):
    def __init__(self, beginnings: tuple[str, ...]):
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.beginnings)


def silence_third_party_noise() -> None:
    """Install the filters (idempotent); before the libraries are imported is best, as
    bitsandbytes speaks on import (a logger's filters hold from before it exists)."""
    for name, beginnings in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(beginnings))
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
