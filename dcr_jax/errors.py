"""The one exception type whose message is shown to users as a single line."""


class UserError(Exception):
  """Bad input from the user (file, config key, name): the message names the bad thing and the fix."""
