"""Every command of megaphi, one module each with a ``main(argv=None)``: installed as console scripts by
pyproject.toml (megaphi-preprocess, megaphi-convert, ...); tools/NAME.py are wrappers that call the same
main for ``python tools/NAME.py``. The library code they drive lives in the packages (data/, model/, ...)."""


def add_version_flag(parser):
    """--version: the command's name and megaphi's version, on stdout."""
    from megaphi import __version__

    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")
