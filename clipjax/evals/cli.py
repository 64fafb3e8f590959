"""`clipjax eval | embed | search` subcommands."""


def register(sub) -> None:
    """Adds the evaluation and search subcommands to the `clipjax` argument parser."""
