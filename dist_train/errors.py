"""The errors a user's mistake raises: each is reported as one line and a non-zero exit, never
a traceback (the CLI prints it once). The lowest layer: every module may raise them."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never a traceback."""


class ConfigError(UserError):
    """A config key with a wrong value, type or name; the message names the key."""
