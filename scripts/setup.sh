#!/usr/bin/env bash
# Installs what meshtrain needs from Debian's archive (DESIGN §6). Idempotent: when every
# package is already there it prints nothing and touches nothing. Run as root (or via sudo).
set -euo pipefail

packages=(
  # toolchain
  g++ make cmake ninja-build git pkg-config
  # LibTorch (CPU) and a fast BLAS: without libopenblas0-openmp LibTorch's matmuls fall back
  # to the reference BLAS, about 20x slower.
  libtorch-dev libopenblas0-openmp
  # MPI, flags, tests, JSON, gzip (Fashion-MNIST)
  libopenmpi-dev openmpi-bin libcxxopts-dev catch2 nlohmann-json3-dev zlib1g-dev
  # real data: the fortunes corpus and Fashion-MNIST
  fortunes dataset-fashion-mnist
  # the PyTorch side of the comparisons and export check; charts
  python3-torch python3-matplotlib
  # fuzzing (scripts/fuzz.sh): clang and its libFuzzer, ASan and UBSan runtimes
  clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
