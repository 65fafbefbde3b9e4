"""The command-line tools, installed as commands by setup.py's console_scripts (megaphi-train,
megaphi-preprocess, megaphi-convert, ...). tools/NAME.py runs the same code as `python tools/NAME.py`."""
import importlib.util


def exec_tool(name, namespace):
    """Run megaphi.cli.NAME's code in `namespace`, the globals of tools/NAME.py.

    The tools file then is the tool module itself, with its own globals, rather than a re-export: code
    that loads tools/NAME.py by path and patches its globals, or pickles its functions into worker
    processes, behaves as before; run as a script, the module's own `if __name__ == "__main__"` runs
    main(). No sys.path change is involved: megaphi is found as the installed package.
    """
    spec = importlib.util.find_spec(f"megaphi.cli.{name}")
    exec(spec.loader.get_code(spec.name), namespace)


def add_version_flag(parser):
    """--version: the command's name and megaphi's version, on stdout."""
    from megaphi import __version__

    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")
