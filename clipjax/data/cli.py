"""`clipjax data ...` subcommands."""


def register(sub) -> None:
    """Adds the data subcommands to the `clipjax` argument parser."""
