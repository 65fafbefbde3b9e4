"""Exit 1 (listing them) when installed packages differ from the versions pinned in constraints.txt.

tools/test.sh runs this before the suite so an environment that kept other versions is brought back to
the tested ones (by tools/install.sh) instead of silently testing against whatever it happens to hold."""

import re
import sys
from importlib import metadata
from pathlib import Path


def pinned_versions(path):
    """{normalized name: version} for every `name==version` line (comments and blanks skipped)."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def mismatches(pins):
    installed = {normalize(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    return [
        f"{name} {installed.get(name, 'missing')} (pinned {version})"
        for name, version in sorted(pins.items())
        if installed.get(name) != version
    ]


def main(argv):
    path = argv[1] if len(argv) > 1 else "constraints.txt"
    wrong = mismatches(pinned_versions(path))
    if wrong:
        print(
            f"{len(wrong)} package(s) differ from {path}: " + ", ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
