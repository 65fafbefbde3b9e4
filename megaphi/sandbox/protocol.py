"""The messages between the host (megaphi.sandbox.host) and a worker (megaphi.sandbox.worker).

Both sides import this module, so a field is named once. Every message travels as one JSON line,
{"type": <tag>, <field>: <value>, ...}:

    host -> worker   WorkerSettings   once, first line: how the worker sets itself up
    worker -> host   Hello            once, after setup: which layers hold
    host -> worker   Job              one program to run
    worker -> host   Report           how that program ended (one per Job)
    init -> runner   InitStatus       inside the worker's process tree: how the program's process ended

decode() checks the tag, that every field is known and present (or has a default) and that each
value has its declared type; anything else raises ProtocolError with a one-line message.
Standard library only: the worker may run on another interpreter than the host.
"""

import dataclasses
import json
import typing
from typing import Dict, List, Optional, Type, TypeVar, Union

Message = TypeVar("Message")


class ProtocolError(ValueError):
    """A line that is not a well-formed message of the expected type."""


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    isolate: bool  # enter namespaces (False: the process tree runs on the host)
    hide: List[str]  # folders covered by an empty read-only tmpfs
    memory_bytes: int  # memory.max of the worker's cgroup (the whole program tree)
    cgroup: bool  # try to make a cgroup v2 leaf
    cgroup_parent: Optional[str]  # tried first for that leaf
    expose: List[str]  # the interpreter's folders programs must read
    uncover: Dict[str, List[str]]  # closed folder above the interpreter -> folders bound back inside


@dataclasses.dataclass(frozen=True)
class Hello:
    pid: int
    namespaces: List[str]  # of "net", "user", "mount"
    read_only_fs: bool
    hidden: List[str]
    tree_memory: str  # what bounds the memory of a program tree, in words
    syscall_filter: str  # "seccomp: ..." or "unavailable: why"
    exposed: List[str] = dataclasses.field(default_factory=list)
    cgroup: Optional[str] = None  # the worker's cgroup folder (the host removes it after the worker)
    cgroup_note: Optional[str] = None
    namespace_error: Optional[str] = None
    mount_error: Optional[str] = None
    expose_error: Optional[str] = None
    writable_mounts: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Job:
    source: str
    runner_marker: bool  # the worker makes a marker and prints it after the program returned
    uid: Optional[int]  # the program's uid/gid (root host); None: keep the worker's
    gid: Optional[int]
    timeout_seconds: float
    cpu_seconds: int
    memory_bytes: int
    file_bytes: int
    tmpfs_bytes: int
    tmpfs_inodes: int
    nproc: Optional[int]
    output_bytes: int
    env: Dict[str, str]
    host_tmpdir: str  # where a working folder is made when there is no private /tmp


@dataclasses.dataclass(frozen=True)
class Report:
    namespaces: List[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None  # the worker could not run the program (set up, init, gone)
    namespace_error: Optional[str] = None
    cgroup_error: Optional[str] = None
    private_tmp: bool = False
    marker: Optional[str] = None  # the marker the runner printed (Job.runner_marker)
    returncode: Optional[int] = None
    timed_out: bool = False
    timeout_kind: Optional[str] = None  # "alarm" (SIGALRM ended it) or "killed" (1 s later)
    memory_exceeded: bool = False
    duration_seconds: float = 0.0
    stdout: str = ""
    stdout_tail: str = ""  # the last bytes of stdout, where the marker is looked for
    stderr: str = ""


@dataclasses.dataclass(frozen=True)
class InitStatus:
    status: Optional[int] = None  # the program's wait status
    memory_exceeded: bool = False
    error: Optional[str] = None


_TAGS = {"settings": WorkerSettings, "hello": Hello, "job": Job, "report": Report, "init_status": InitStatus}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}


def encode(message) -> bytes:
    """One JSON line (with its newline)."""
    tag = _TAG_OF.get(type(message))
    if tag is None:
        raise ProtocolError(f"sandbox protocol: {type(message).__name__} is not a message")
    return (json.dumps({"type": tag, **dataclasses.asdict(message)}) + "\n").encode()


def decode(line: Union[bytes, str], expected: Type[Message]) -> Message:
    """The message of type `expected` in `line`; ProtocolError if it is anything else."""
    try:
        obj = json.loads(line)
    except (TypeError, ValueError) as e:  # TypeError: not text at all (None at end of input)
        raise ProtocolError(f"sandbox protocol: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"sandbox protocol: expected a JSON object, got {type(obj).__name__}")
    tag = obj.pop("type", None)
    if tag not in _TAGS:
        raise ProtocolError(f"sandbox protocol: unknown message type {tag!r}")
    if _TAGS[tag] is not expected:
        raise ProtocolError(f"sandbox protocol: expected a {_TAG_OF[expected]!r} message, got {tag!r}")
    hints = typing.get_type_hints(expected)
    fields = {f.name: f for f in dataclasses.fields(expected)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise ProtocolError(f"sandbox protocol: {tag} has unknown fields {unknown}")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in obj and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ProtocolError(f"sandbox protocol: {tag} lacks fields {missing}")
    for name, value in obj.items():
        if not _conforms(value, hints[name]):
            raise ProtocolError(f"sandbox protocol: {tag}.{name} = {value!r:.80} is not {_describe(hints[name])}")
    return expected(**obj)


def _conforms(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_conforms(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 2.0 as 2.0 but a hand-made 2 is fine too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
