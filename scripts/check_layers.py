#!/usr/bin/env python3
"""Checks that every module of server/src imports only modules of lower layers.

The layers are written once, in docs/ARCHITECTURE.md, between the lines
`<!-- layers: begin -->` and `<!-- layers: end -->`: one line per layer, top first,
`NAME: module, module  # why`. A module's imports are its `crate::NAME` references
outside `#[cfg(test)]` code and comments. A module missing from the table, or an
import of the same or a higher layer, fails the check with the file that imports it.

    python3 scripts/check_layers.py            # from the project root
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
SRC = os.path.join(ROOT, "server", "src")


def layers():
    text = open(DOC, encoding="utf-8").read()
    m = re.search(r"<!-- layers: begin -->(.*?)<!-- layers: end -->", text, re.S)
    if not m:
        sys.exit(f"{DOC}: no layer table between <!-- layers: begin --> and <!-- layers: end -->")
    rows = [l.split("#")[0].strip() for l in m.group(1).splitlines()]
    rows = [r for r in rows if r and not r.startswith("```")]
    rank = {}
    for height, row in enumerate(reversed(rows)):
        _, _, names = row.partition(":")
        for name in (n.strip() for n in names.split(",")):
            if name:
                rank[name] = height
    return rank


def imports():
    found = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            top = os.path.relpath(path, SRC).split(os.sep)[0].removesuffix(".rs")
            if top in ("main", "lib"):
                continue
            text = open(path, encoding="utf-8").read()
            cut = text.find("#[cfg(test)]")
            if cut >= 0:
                text = text[:cut]
            text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
            for dep in re.findall(r"crate::([a-z_][a-z0-9_]*)", text):
                if dep != top:
                    found.setdefault(top, {}).setdefault(dep, os.path.relpath(path, ROOT))
            found.setdefault(top, {})
    return found


def main():
    rank = layers()
    bad = 0
    checked = 0
    for module, deps in sorted(imports().items()):
        if module not in rank:
            print(f"FAIL {module}: not in the layer table of docs/ARCHITECTURE.md")
            bad += 1
            continue
        for dep, where in sorted(deps.items()):
            checked += 1
            if dep not in rank:
                continue  # a crate item that is not a module (a macro, say)
            if rank[dep] >= rank[module]:
                print(f"FAIL {where}: {module} (layer {rank[module]}) imports {dep} (layer {rank[dep]})")
                bad += 1
    print(f"layer-checks: {checked - bad if checked >= bad else 0} passed, {bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
