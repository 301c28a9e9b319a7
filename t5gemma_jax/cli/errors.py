"""How a failed command reads: bad input (a flag, a binding, a file) is one line and exit 2,
anything else one line and exit 1; tracebacks only when asked for."""

from __future__ import annotations

import sys
import traceback

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1

# Errors that describe bad input: their message is the whole story.
INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
                NotADirectoryError, IsADirectoryError, PermissionError, ImportError,
                FloatingPointError)


def message(e: BaseException) -> str:
  """The error as one line, without gin's "In call to configurable" trailer."""
  text = str(e) if not isinstance(e, KeyError) else f"missing {e.args[0]!r}" if e.args else ""
  # gin appends a line naming the Python class; our messages already name the binding.
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith("In call to configurable")]
  return " ".join(lines) or type(e).__name__


def report(command: str, e: BaseException, verbose: bool) -> int:
  """Prints `t5gemma COMMAND: error: ...` on stderr and returns the exit status."""
  if verbose:
    traceback.print_exc()
  bad_input = isinstance(e, INPUT_ERRORS)
  hint = "" if bad_input or verbose else " (--verbose shows the traceback)"
  kind = "" if bad_input else type(e).__name__ + ": "
  print(f"t5gemma {command}: error: {kind}{message(e)}{hint}", file=sys.stderr)
  return EXIT_BAD_INPUT if bad_input else EXIT_FAILURE
