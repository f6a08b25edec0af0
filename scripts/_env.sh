# Sourced by scripts/demo and scripts/test: make (or reuse) the project's virtual environment in .venv
# with the exact tested set (constraints.txt), the faiss-cpu and cleanlab extras and the test tools,
# installed editable: the README's install command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.dmlp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[faiss,cleanlab,test]"
    touch "$stamp"
fi
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
