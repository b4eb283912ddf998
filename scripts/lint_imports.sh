#!/usr/bin/env bash
# Import layering: a lower layer never imports a higher one, and the engine package imports no LLM
# framework. Layers, top to bottom:
#   4 faces:   cli, prewarm(_cli), datasets, testing, integrations/
#   3 engine:  semtoken_rag/engine.py, semtoken_rag/registry.py, prepare, batching
#   2 method:  analysis, encoder, graphs, spans, structure, budget, render, repeats, device_search, text (and results, config)
#   1 storage: keys, fileformat, lru, store, writebehind, forksafe, diskstore, redis_store, store_url
# Exits non-zero and names each offending import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" - <<'PYEOF'
import ast
import pathlib
import sys

LAYER = {
    "cli": 4, "datasets": 4, "__main__": 4, "prewarm": 4, "prewarm_cli": 4, "testing": 4,
    "engine": 3, "registry": 3, "__init__": 3, "prepare": 3, "batching": 3,
    "encoder": 2, "spans": 2, "structure": 2, "budget": 2, "render": 2, "repeats": 2, "text": 2,
    "device_search": 2, "evidence": 2, "analysis": 2, "graphs": 2,
    "results": 2, "config": 2,
    "keys": 1, "fileformat": 1, "store": 1, "diskstore": 1, "lru": 1, "redis_store": 1, "store_url": 1,
    "writebehind": 1, "forksafe": 1,
}
FRAMEWORKS = ("langchain", "langchain_core", "langchain_community", "llama_index")
errors = []
pkg = pathlib.Path("semtoken_rag")
for path in sorted(pkg.rglob("*.py")):
    module = path.stem
    if module not in LAYER:
        errors.append(f"{path}: module not in the layer table of scripts/lint_imports.sh")
        continue
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                names = [f"semtoken_rag.{node.module}"] if node.module else \
                    [f"semtoken_rag.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                         if node.module == "semtoken_rag" else [])
        for name in names:
            top = name.split(".")[0]
            if top in FRAMEWORKS:
                errors.append(f"{path}:{node.lineno}: the engine package imports {name}")
            if top == "semtoken_rag" and "." in name:
                target = name.split(".")[1]
                if target in LAYER and LAYER[target] > LAYER[module]:
                    errors.append(f"{path}:{node.lineno}: {module} (layer {LAYER[module]}) imports "
                                  f"{target} (layer {LAYER[target]}), a higher layer")
print("\n".join(errors) if errors else "import layers: ok")
sys.exit(1 if errors else 0)
PYEOF
