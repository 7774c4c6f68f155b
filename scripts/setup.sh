#!/usr/bin/env bash
# Installs what sparsejax needs on a fresh machine: the Fashion-MNIST files (Debian package
# dataset-fashion-mnist, where apt-get exists) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e '.[test]'
