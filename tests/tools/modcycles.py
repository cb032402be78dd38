#!/usr/bin/env python3
"""Module dependency cycles in a Rust library crate's src/.

Every .rs file is a module (mod.rs / lib.rs name their folder). References are `crate::a::b`
paths (in `use` trees, braces expanded, and inline) and `super::` / `self::` paths resolved
against the file's module. Comments are dropped. Three granularities:
  top   - the first segment (config, discovery, connect, ...)
  stage - the first segment, with discovery split into its pieces (discovery::source,
          discovery::registry, discovery::health, ...); config, connect, dns, ops whole
  group - the first segment, with the four stage folders (discovery, connect, dns, ops)
          split into their pieces (connect::table, dns::answer, ops::admin, ...)
  file  - every module; an edge between a module and its own ancestor or descendant is
          ignored (a parent declares its children, children use their parent's items)
Prints each granularity's cycles (strongly connected components of more than one node)
and, for `group`, the edges, so the direction of each dependency can be read.
"""
import os
import re
import sys
from collections import defaultdict

ROOT = sys.argv[1] if len(sys.argv) > 1 else "src"
SKIP = {"main.rs", "cli.rs"}  # the binary crate: nothing in the library can use it
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        # Drop `//` comments, but not `//` inside a string literal (good enough for this code).
        i, in_str = 0, False
        while i < len(line):
            c = line[i]
            if c == '"' and (i == 0 or line[i - 1] != "\\"):
                in_str = not in_str
            if not in_str and line.startswith("//", i):
                line = line[:i]
                break
            i += 1
        out.append(line)
    return "\n".join(out)


def parse_tree(s, i):
    """Parses a use tree at s[i:]; returns (list of segment lists, end index)."""
    paths, segs = [], []
    while True:
        m = re.compile(r"\s*(" + IDENT + r"|\*|\{)").match(s, i)
        if not m:
            return ([segs] if segs else []), i
        tok = m.group(1)
        i = m.end()
        if tok == "{":
            while True:
                sub, i = parse_tree(s, i)
                paths += [segs + p for p in sub] or [segs]
                m2 = re.compile(r"\s*([,}])").match(s, i)
                if not m2:
                    return paths, i
                i = m2.end()
                if m2.group(1) == "}":
                    return paths, i
                if re.compile(r"\s*\}").match(s, i):
                    i = re.compile(r"\s*\}").match(s, i).end()
                    return paths, i
        if tok == "*":
            return [segs], i
        segs = segs + [tok]
        m3 = re.compile(r"\s*::").match(s, i)
        if not m3:
            return [segs], i
        i = m3.end()


def refs(text, module):
    found = []
    for m in re.finditer(r"\b(crate|super|self)((?:\s*::\s*super)*)\s*::", text):
        base = m.group(1)
        ups = m.group(2).count("super")
        if base == "crate":
            start = ()
        elif base == "self":
            start = module
        else:
            start = module[: max(0, len(module) - 1 - ups)]
        paths, _ = parse_tree(text, m.end())
        for p in paths:
            found.append(start + tuple(p))
    return found


def resolve(path, modules):
    """The longest known module that `path` starts with."""
    for n in range(len(path), -1, -1):
        if path[:n] in modules:
            return path[:n]
    return ()


def group_of(mod, split):
    if not mod:
        return "crate"
    if mod[0] in split and len(mod) > 1:
        return "::".join(mod[:2])
    return mod[0]


def sccs(nodes, edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def main():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for n in names:
            if n.endswith(".rs"):
                rel = os.path.relpath(os.path.join(dirpath, n), ROOT)
                if rel in SKIP:
                    continue
                files[module_of(rel)] = os.path.join(dirpath, n)
    modules = set(files)
    deps = defaultdict(set)  # module -> modules it references
    for mod, path in files.items():
        with open(path, encoding="utf-8") as f:
            text = strip_comments(f.read())
        for p in refs(text, mod):
            target = resolve(p, modules)
            if target and target != mod:
                deps[mod].add(target)

    # `group`: the stage folders split into their pieces (the architecture's table);
    # `stage`: as the review asked, discovery split, connect, dns and ops whole.
    splits = {"group": {"discovery", "connect", "dns", "ops"}, "stage": {"discovery"}}
    ok = True
    for level in ("top", "stage", "group", "file"):
        nodes, edges, why = set(), defaultdict(set), defaultdict(set)
        for a in modules:
            for b in deps[a]:
                if level == "file":
                    if a[: len(b)] == b or b[: len(a)] == a:
                        continue
                    ga, gb = "::".join(a), "::".join(b)
                elif level == "top":
                    ga, gb = a[0] if a else "crate", b[0] if b else "crate"
                else:
                    ga, gb = group_of(a, splits[level]), group_of(b, splits[level])
                nodes |= {ga, gb}
                if ga != gb:
                    edges[ga].add(gb)
                    why[(ga, gb)].add("::".join(a) + " -> " + "::".join(b))
        cycles = sccs(nodes, edges)
        print(f"[{level}] {len(nodes)} modules, {sum(len(v) for v in edges.values())} edges: "
              + ("no cycles" if not cycles else f"{len(cycles)} cycle(s)"))
        for c in cycles:
            ok = False
            print("  cycle:", " <-> ".join(c))
            for a in c:
                for b in sorted(edges[a] & set(c)):
                    print(f"    {a} -> {b}: " + "; ".join(sorted(why[(a, b)])))
        if level == "group" and "-v" in sys.argv:
            for a in sorted(edges):
                print(f"  {a} -> {', '.join(sorted(edges[a]))}")
    sys.exit(0 if ok else 1)


main()
