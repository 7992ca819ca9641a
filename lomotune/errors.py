"""The base of lomotune's errors: a problem a person can act on, whose message says what
to do, and the exit code the command ends with. The CLI catches LomotuneError once and
prints the message without a traceback."""

from __future__ import annotations

# Exit codes (README lists them): 1 anything else, 2 a bad input (recipe, data, model,
# output folder, options).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class LomotuneError(Exception):
    """An error lomotune reports as a message and an exit code. `exit_code` is the class's
    (EXIT_BAD_INPUT unless a subclass says otherwise) or the one given to the instance."""

    exit_code: int = EXIT_BAD_INPUT
    # True on the other ranks of a run when rank 0 raised it in `share_from_main`: rank 0
    # prints it, they exit with its code without printing it again.
    printed_by_rank_0: bool = False

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
