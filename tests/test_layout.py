"""The house rules, measured on the files as they are (the code is formatted by `ruff format` at
100 columns, .ci/run checks that): every top-level script is at most 500 lines and about as dense
as nanoGPT's, train.main reads top to bottom, the README is a front door, and the scripts stack by
stage without an import cycle."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, '*.py')))
NAMES = {os.path.basename(p)[:-3] for p in SCRIPTS}


def lines(path):
    with open(path, encoding='utf-8') as f:
        return f.read().splitlines()


def test_scripts_are_short_and_not_packed():
    long_files = {os.path.basename(p): len(lines(p)) for p in SCRIPTS if len(lines(p)) > 500}
    assert not long_files, f"over 500 lines (split along a seam a reader expects): {long_files}"
    wide = [
        f"{os.path.basename(p)}:{i}"
        for p in SCRIPTS + glob.glob(os.path.join(ROOT, 'tests', '*.py'))
        for i, line in enumerate(lines(p), 1)
        if len(line) > 100
    ]
    assert not wide, f"lines over 100 characters: {wide[:10]}"
    n_bytes = sum(os.path.getsize(p) for p in SCRIPTS)
    n_lines = sum(len(lines(p)) for p in SCRIPTS)
    # nanoGPT: 44 bytes a line
    assert n_bytes / n_lines <= 48, f"{n_bytes / n_lines:.1f} bytes a line: lines are packed"


def test_train_main_reads_top_to_bottom():
    tree = ast.parse(open(os.path.join(ROOT, 'train.py')).read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'main')
    assert main.end_lineno - main.lineno + 1 <= 150
    inner = [n for n in ast.walk(main) if isinstance(n, (ast.Lambda, ast.FunctionDef))]
    assert inner == [main], "no lambdas or nested functions in train.main"


def test_readme_is_a_front_door():
    assert len(lines(os.path.join(ROOT, 'README.md'))) <= 250


def imports(path):
    """The project's modules that a script imports, anywhere in it (a lazy import is a dependency
    too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split('.')[0])
    return found & NAMES


def test_no_import_cycles():
    graph = {os.path.basename(p)[:-3]: imports(p) for p in SCRIPTS}
    state = {}

    def visit(name, path):
        if state.get(name) == 'done':
            return
        assert state.get(name) != 'open', f"import cycle: {' -> '.join(path + [name])}"
        state[name] = 'open'
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        state[name] = 'done'

    for name in sorted(graph):
        visit(name, [])
