#!/usr/bin/env python3
"""The house's size rules for product code (tests aside): no source file over 700 lines before
its test module, no function over 150 lines. Prints each breach and exits 1 if there is one."""
import os
import re
import sys

FILE_MAX, FN_MAX = 700, 150
ROOTS = ["src", "runtime/src", "operators/src", "graphs/src", "kernels/src"]
FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def strip(line):
    """The line without strings, chars and comments (enough to count braces)."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//")[0]


def breaches(path):
    lines = open(path).read().split("\n")
    code = lines[: next((i for i, l in enumerate(lines) if l.startswith("#[cfg(test)]")), len(lines))]
    if len(code) > FILE_MAX:
        yield f"{path}: {len(code)} lines before its tests (at most {FILE_MAX})"
    for i, line in enumerate(code):
        m = FN.match(line)
        if not m:
            continue
        depth, opened, j = 0, False, i
        while j < len(code):
            s = strip(code[j])
            depth += s.count("{") - s.count("}")
            opened = opened or "{" in s
            if (opened and depth <= 0) or (not opened and s.rstrip().endswith(";")):
                break
            j += 1
        if opened and j - i + 1 > FN_MAX:
            yield f"{path}:{i + 1}: fn {m.group(6)} is {j - i + 1} lines (at most {FN_MAX})"


def main():
    found = []
    for root in ROOTS:
        for dirpath, _, files in os.walk(root):
            if "/tests" in dirpath:
                continue
            for f in sorted(files):
                if f.endswith(".rs") and f != "tests.rs":
                    found.extend(breaches(os.path.join(dirpath, f)))
    for b in found:
        print(b)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
