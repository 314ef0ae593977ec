#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, torchvision, accelerate, onnx(runtime), OpenCV and
# the rest but not this project's less common dependencies, and can't download (docs/gpu.md):
# run here, where pip reaches a package index; copy or carry .whl/ there; gpu_check.sh installs
# them into /tmp/site when they are missing.
# Usage: scripts/gpu_wheels.sh [PYTHON_VERSION]   (the GPU machine's, default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
pins=()
for name in webdataset braceexpand onnxsim faster-coco-eval torch-pruning; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "gpu_wheels.sh: $name is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
