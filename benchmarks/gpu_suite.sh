#!/usr/bin/env bash
# The GPU benchmark suite in one command, for a lent NVIDIA GPU (H100/H200 class):
#   train-step throughput and MFU of ViT-B/16, L/16, H/14 (bfloat16, cuDNN attention, batches 256/128/64),
#   the MAE speedup over mask tokens in the encoder (ViT-L/16), and mae_jax vs PyTorch (ViT-B/16),
# written as one markdown table to --out (default benchmarks/gpu_results.md) and printed.
#
#   bash benchmarks/gpu_suite.sh [--out=FILE] [--budget_s=480] [--only=train,speedup,vs_pytorch]
#   bash benchmarks/gpu_suite.sh --dry_run      # the setup and the commands, nothing run
#   bash benchmarks/gpu_suite.sh --cpu_smoke    # the whole suite on the CPU with the tiny model
#
# Setup: with --setup=auto (the default) the interpreter (--python, default .venv/bin/python, or python3 on
# PATH when there is no .venv) is used as it is when it imports mae_jax from this checkout and its JAX sees a
# GPU; otherwise `bash .ci/setup dev,gpu,torch` installs jax[cuda12], torch and transformers into .venv
# first (needs the package index; not counted in the budget). Every benchmark runs
# in its own process under a timeout within --budget_s seconds; one that fails is marked in the table and
# the suite goes on. A preflight runs cuDNN's attention at the suite's shapes first; if it fails, every row
# runs XLA's attention and the table's header says why. Exit status: 0 when every row is ok, 1 when one is
# not (the table is written either way), 2 for a bad argument.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options of this script (the others go to benchmarks/gpu_suite.py, listed below):
  --setup=auto|always|never  install the GPU environment when needed (auto), always, or never
  --python=PATH              interpreter with JAX (default .venv/bin/python; python3 where there is no .venv)
EOF
  echo
  "${bootstrap}" benchmarks/gpu_suite.py --help | sed -n '/^options:/,$p; /^optional arguments:/,$p'
}

bootstrap="$(command -v python3 || command -v python || true)"
if [ -z "${bootstrap}" ]; then
  echo "error: no python3 on PATH; install Python 3.10+ first" >&2
  exit 1
fi

setup=auto
python=.venv/bin/python
python_given=0
cpu_smoke=0
dry_run=0
pass=()
for arg in "$@"; do
  case "${arg}" in
    -h|--help) usage; exit 0 ;;
    --setup=*) setup="${arg#--setup=}" ;;
    --python=*) python="${arg#--python=}"; python_given=1 ;;
    --python|--setup|--out|--workdir|--budget_s|--only)
      echo "error: ${arg} needs a value: write ${arg}=VALUE" >&2; exit 2 ;;
    --cpu_smoke) cpu_smoke=1; pass+=("${arg}") ;;
    --dry_run) dry_run=1; pass+=("${arg}") ;;
    *) pass+=("${arg}") ;;
  esac
done
case "${setup}" in
  auto|always|never) ;;
  *) echo "error: --setup=${setup}: must be auto, always or never" >&2; exit 2 ;;
esac
# Refuses unknown options (exit 2) before anything is installed; needs only the standard library.
"${bootstrap}" benchmarks/gpu_suite.py --check_args ${pass[@]+"${pass[@]}"}

# Absolute, links kept (a venv's python is one), also for a path that does not exist yet (.venv before setup).
case "${python}" in
  /*) ;;
  */*) python="$(pwd)/${python#./}" ;;
esac

check_error=''
check() {  # check gpu|cpu PYTHON: mae_jax's step imports and JAX has the backend; else check_error says why.
  check_error="$(PYTHONPATH="$(pwd)${PYTHONPATH:+:${PYTHONPATH}}" "$2" - "$1" 2>&1 >/dev/null <<'EOF'
import sys
try:
  import jax
  from mae_jax import pretrain_step  # noqa: F401  (the step the benchmarks build; no TensorFlow)
except Exception as e:  # pylint: disable=broad-except
  sys.exit(f'cannot import mae_jax.pretrain_step: {type(e).__name__}: {e}')
if jax.default_backend() != sys.argv[1]:
  sys.exit(f'JAX sees no {sys.argv[1].upper()}: default backend {jax.default_backend()}, devices {jax.devices()}')
EOF
)" && return 0
  check_error="$(printf '%s\n' "${check_error}" | tail -n 1)"
  return 1
}

torch_cuda() {
  "$1" -c 'import sys, torch, transformers; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

if [ "${dry_run}" -eq 1 ]; then
  if [ "${cpu_smoke}" -eq 0 ] && [ "${setup}" != never ]; then
    echo "# setup (${setup}): bash .ci/setup dev,gpu,torch when ${python} has no JAX that sees a GPU"
  fi
  exec "${bootstrap}" benchmarks/gpu_suite.py --python="${python}" ${pass[@]+"${pass[@]}"}
fi

if [ "${cpu_smoke}" -eq 1 ]; then
  export JAX_PLATFORMS=cpu
  if [ "${python_given}" -eq 0 ] && [ ! -x "${python}" ]; then python="${bootstrap}"; fi
  if ! check cpu "${python}"; then
    echo "error: ${python}: ${check_error}" >&2
    echo "fix: run 'bash .ci/setup dev,torch' or pass --python=PATH" >&2
    exit 1
  fi
else
  echo "# nvidia-smi"
  nvidia-smi || echo "warning: nvidia-smi failed (no NVIDIA driver?)" >&2
  unset JAX_PLATFORMS  # a CPU-only setting from the shell would hide the GPU
  bootstrap_error=''  # Why python3 on PATH was not used as it is (no .venv), for a failed setup's message.
  if [ "${setup}" = auto ] && [ "${python_given}" -eq 0 ] && [ ! -x "${python}" ]; then
    if check gpu "${bootstrap}"; then
      echo "# no .venv: ${bootstrap} imports mae_jax and its JAX sees a GPU; using it as it is"
      python="${bootstrap}"
    else
      bootstrap_error="${check_error}"
    fi
  fi
  if [ "${setup}" = always ] || { [ "${setup}" = auto ] && ! check gpu "${python}"; }; then
    if [ "${python}" != "$(pwd)/.venv/bin/python" ]; then
      echo "error: JAX in --python=${python} sees no GPU, and the setup installs into .venv only:" \
           "install jax[cuda12] there or leave --python out" >&2
      exit 1
    fi
    echo "# setup: bash .ci/setup dev,gpu,torch"
    start=$(date +%s)
    if ! bash .ci/setup dev,gpu,torch; then
      echo "error: bash .ci/setup dev,gpu,torch failed (it needs the package index)" >&2
      if [ -n "${bootstrap_error}" ]; then
        echo "  ${bootstrap} was not used as it is: ${bootstrap_error}" >&2
        echo "fix: offline, put what it lacks on PYTHONPATH (pip install --no-index --no-deps --target DIR" \
             "WHEELS) and pass --python=${bootstrap} --setup=never" >&2
      fi
      exit 1
    fi
    echo "# setup took $(( $(date +%s) - start )) s"
  fi
  if ! check gpu "${python}"; then
    echo "error: ${python}: ${check_error}" >&2
    echo "fix: bash .ci/setup dev,gpu,torch (jax[cuda12]), or --python=PATH of an environment with GPU JAX" >&2
    exit 1
  fi
  if ! torch_cuda "${python}"; then
    echo "warning: torch in ${python} has no CUDA (or transformers is missing): the mae_jax vs PyTorch row" \
         "will fail; install a CUDA build of torch there (pip install --force-reinstall torch)" >&2
  fi
fi

exec "${python}" benchmarks/gpu_suite.py --python="${python}" ${pass[@]+"${pass[@]}"}
