"""How a command ends on a refusal: a bad config or bad data is one line on stderr that names the key or file and the
fix, and exit status 2, never a Python traceback; `--debug` (or HYDRA_FULL_ERROR=1, Hydra's own switch) shows the
traceback instead. Failures that are not the user's to fix (a run that crashed) keep their status and traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from app.errors import UserError

DEBUG_FLAG = "--debug"
REFUSED = 2  # the exit status of a refusal (bad config or data)
REFUSALS = (UserError, HydraException, OmegaConfBaseException)  # Hydra's: unknown key, group option, bad override


def debugging(argv: Sequence[str]) -> bool:
    """Whether a refusal should show its traceback: `--debug` among the arguments, or HYDRA_FULL_ERROR=1."""
    return DEBUG_FLAG in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(err: BaseException) -> str:
    """The refusal as one line: the message's lines joined (Hydra's messages span several), without the config
    search path Hydra appends to a missing group option."""
    message = str(err).split("Config search path:")[0]
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"error: {text or type(err).__name__}"


def refuse(err: BaseException, debug: bool) -> int:
    """Print `err` as one line and return REFUSED, or (debug) raise it with its traceback."""
    if debug:
        raise err
    print(one_line(err), file=sys.stderr)
    return REFUSED


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main(argv)` (argv without `--debug`), turning a refusal into one line and status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(args)
    try:
        return main([a for a in args if a != DEBUG_FLAG])
    except REFUSALS as err:
        return refuse(err, debug)
