"""The one error type a user fixes: a bad config key, a bad or missing data file. Its message names the key or file
and the fix; the commands print it as one line and exit with status 2 (app/runners/cli.py)."""


class UserError(Exception):
    """A problem in what the user gave (config, data), not in the code: the message says what and how to fix it."""
