"""The command-line tools, installed as commands by setup.py's console_scripts (megaphi-train,
megaphi-preprocess, megaphi-convert, ...); tools/*.py run the same mains as `python tools/NAME.py`."""


def tool_wrapper_namespace(module):
    """What tools/NAME.py re-exports of megaphi.cli.NAME, private helpers included, so code that imports
    the tool file by path keeps working."""
    return {k: v for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))}
