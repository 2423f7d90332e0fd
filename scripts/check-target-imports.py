#!/usr/bin/env python3
"""Every target in Package.swift declares the modules its sources import.

    python3 scripts/check-target-imports.py      # exit 1 and a list if one does not

A module imported but not declared still builds when another dependency happens to pull it
in, and breaks when that one changes; this check keeps Package.swift the true picture of who
uses what (docs/architecture.md). Toolchain modules (Foundation, Glibc, Testing, ...) are
not declared and not checked.
"""

import os
import re
import sys

TOOLCHAIN = {"Foundation", "FoundationEssentials", "Glibc", "Musl", "Darwin", "Dispatch", "Synchronization",
             "Testing", "XCTest", "_Concurrency", "os"}


def targets(package):
    out = {}
    for m in re.finditer(r'\.(target|executableTarget|testTarget|systemLibrary)\(\s*name:\s*"([^"]+)"', package):
        kind, name = m.group(1), m.group(2)
        # The target's arguments run to the next target declaration (or the end of the list).
        nxt = re.search(r'\.(target|executableTarget|testTarget|systemLibrary)\(\s*name:', package[m.end():])
        body = package[m.end(): m.end() + nxt.start()] if nxt else package[m.end():]
        deps = set()
        d = re.search(r'dependencies:\s*\[(.*?)\]\s*(,|\))', body, re.S)
        if d:
            deps |= set(re.findall(r'\.product\(name:\s*"([^"]+)"', d.group(1)))
            deps |= set(re.findall(r'(?<![:\w])"([^"]+)"', re.sub(r'\.product\([^)]*\)', '', d.group(1))))
        p = re.search(r'path:\s*"([^"]+)"', body)
        path = p.group(1) if p else os.path.join("Tests" if kind == "testTarget" else "Sources", name)
        out[name] = (path, deps)
    return out


def imports(path):
    found = set()
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".swift"):
                with open(os.path.join(root, f)) as fh:
                    for line in fh:
                        m = re.match(r'\s*(?:@testable\s+|@_exported\s+|@preconcurrency\s+)*import\s+(?:struct\s+|enum\s+|class\s+|func\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z0-9_.]+)?\s*(?://.*)?$', line)
                        if m:
                            found.add(m.group(1))
    return found


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "Package.swift")) as f:
        package = f.read()
    # Executable targets are imported by their module name (dashes become underscores).
    problems = []
    for name, (path, deps) in sorted(targets(package).items()):
        declared = deps | {d.replace("-", "_") for d in deps}
        for module in sorted(imports(os.path.join(root, path)) - TOOLCHAIN - declared - {name}):
            problems.append(f"{name} ({path}) imports {module} without declaring it")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
