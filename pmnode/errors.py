"""One project error type, caught at the CLI boundary and printed as one line."""


class PmnodeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(PmnodeError, ValueError):
    """Bad configuration. Subclasses ValueError so pydantic validators report it per field."""


class DataError(PmnodeError):
    """Missing or unusable training data."""


class DataMismatchError(DataError):
    """This machine's prepared data or tokenizer is not the run's (a refusal at the join)."""


def run_cli(app) -> None:
    """Run a typer app: a PmnodeError prints one red line and exits 1; --verbose re-raises it."""
    import sys

    from rich.console import Console

    verbose = "--verbose" in sys.argv
    if verbose:
        sys.argv.remove("--verbose")
    try:
        app()
    except PmnodeError as e:
        if verbose:
            raise
        from rich.markup import escape

        # escape: a message may quote a multiaddr or a config value that looks like markup ("[/ip4/...]")
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)
