#!/usr/bin/env python3
"""Checks that every module of server/src imports only modules of lower layers.

Also checks the workspace's crates: each crate's Cargo.toml may name (as a normal
dependency) only the workspace crates its row of the table between
`<!-- crates: begin -->` and `<!-- crates: end -->` lists, so the simulator and the
base crate can never come to depend on the gateway.

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


def crates():
    """(bad, checked) for the crate table against each member's [dependencies]."""
    text = open(DOC, encoding="utf-8").read()
    m = re.search(r"<!-- crates: begin -->(.*?)<!-- crates: end -->", text, re.S)
    if not m:
        sys.exit(f"{DOC}: no crate table between <!-- crates: begin --> and <!-- crates: end -->")
    allowed = {}
    for row in m.group(1).splitlines():
        row = row.split("#")[0].strip()
        if not row or row.startswith("```"):
            continue
        name, _, deps = row.partition(":")
        allowed[name.strip()] = {d.strip() for d in deps.split(",") if d.strip()}
    bad = checked = 0
    for folder in (".", "base", "sim", "server", "client"):
        manifest = os.path.join(ROOT, folder, "Cargo.toml")
        body = open(manifest, encoding="utf-8").read()
        pkg = re.search(r'\[package\][^\[]*?name = "([^"]+)"', body, re.S)
        deps = re.search(r"\n\[dependencies\]\n(.*?)(\n\[|\Z)", body, re.S)
        if not pkg:
            continue
        name = pkg.group(1)
        if name not in allowed:
            print(f"FAIL {manifest}: crate {name} is not in the crate table of docs/ARCHITECTURE.md")
            bad += 1
            continue
        used = set(re.findall(r"^(infergate[a-z-]*)", deps.group(1), re.M)) if deps else set()
        for dep in sorted(used):
            checked += 1
            if dep not in allowed[name]:
                print(f"FAIL {manifest}: {name} depends on {dep}, which its row does not allow")
                bad += 1
    return bad, checked


def main():
    rank = layers()
    bad, checked = crates()
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
