"""The one exception type for bad input."""


class ConfigError(ValueError):
    """Bad user input: one sentence naming the bad value and the valid choices.

    The CLI turns it into a single line on stderr and exit code 2, before anything is
    written.
    """
