"""The base of every error a user can fix from its message alone: a bad config, missing or
corrupt data, an unreadable checkpoint, a diverged run. The CLI prints any of them as one
line, ``error: <message>``, and exits 2, without a traceback."""


class UserError(Exception):
    """An error whose message names the thing at fault and what to do."""
