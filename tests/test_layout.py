"""The README's code map ("How the code is laid out") names every module of the
package, each in the folder it lives in, and nothing that is not there."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "cpift_merge")


def _code_map() -> dict:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for line in section.splitlines():
        m = re.match(r"\| `cpift_merge/(\w+)/` \|(.*)\|\s*$", line)
        if m:
            listed[m.group(1)] = set(re.findall(r"`(\w+\.(?:py|yml))`", m.group(2)))
    return listed


def test_readme_code_map_matches_the_tree():
    on_disk = {}
    for folder in sorted(os.listdir(PKG)):
        path = os.path.join(PKG, folder)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            on_disk[folder] = {f for f in os.listdir(path) if f.endswith((".py", ".yml")) and f != "__init__.py"}
    assert _code_map() == on_disk
    top = {f for f in os.listdir(PKG) if f.endswith(".py")}
    assert top == {"__init__.py", "__main__.py", "cli.py", "errors.py"}  # the rest lives in a layer folder
