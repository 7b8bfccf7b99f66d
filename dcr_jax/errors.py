"""The one exception type whose message is shown to users as a single line, and the command-line wrapper that
shows it."""

import sys
from typing import Callable

from absl import flags, logging


class UserError(Exception):
  """Bad input from the user (file, config key, name): the message names the bad thing and the fix."""


def run_command(body: Callable[[], str]) -> None:
  """Runs a command's body with absl's INFO lines off (unless --verbosity is given) and prints the line it returns;
  a UserError prints `error: …` on one line and exits with status 2."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep backend-probing INFO lines off the terminal
  try:
    line = body()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(line)
