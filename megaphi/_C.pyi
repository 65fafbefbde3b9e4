# Type stub of a compiled extension (built by setup.py from csrc/): its functions are typed loosely here.
from typing import Any

def __getattr__(name: str) -> Any: ...
