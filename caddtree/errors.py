"""The one exception type users see: a mistake in their input, reported as one line."""


class CaddtreeError(Exception):
    """Bad user input or an unusable file; the CLI prints it as one line and exits with code 2."""
