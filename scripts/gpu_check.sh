#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, for a machine with an NVIDIA GPU, its driver and nvcc (about 15 minutes
# on 16 cores, most of it the CUDA build):
#   1. the CUDA build with NCCL: `CAFFE_GPU=1 make install` (timed),
#   2. `caffe device_query` of GPU 0, and Caffe's own convolution and im2col suites, CPU and GPU cases,
#   3. 50 iterations of `emotiw train --gpu 0` against the same run on the CPU: equal losses within 1e-4,
#   4. forward and backward of deploy nets on GPU 0 against the CPU (tests/caffe_outputs.py), within 1e-4,
# then `CAFFE_GPU=0 make install`, so that the venv links the CPU build as before. Steps 3 and 4 run the
# CPU side with the same CUDA build in CPU mode, so that only the device differs.
# Usage: scripts/gpu_check.sh [OUT]   (default OUT: gpu-check/; the summary is OUT/summary.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check}")
mkdir -p "$out"
summary=$out/summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
fail() { say "FAIL: $*"; exit 1; }

command -v nvidia-smi > /dev/null || fail "no nvidia-smi: this machine has no NVIDIA driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$summary"

start=$(date +%s)
CAFFE_GPU=1 make install > "$out/install-gpu.log" 2>&1 || fail "CAFFE_GPU=1 make install (log: $out/install-gpu.log)"
say "CUDA build and install: $(( $(date +%s) - start )) s ($(grep -o 'caffe-[0-9a-f]*' "$out/install-gpu.log" | head -1))"
.venv/bin/python -c "from emotiw.caffe.env import caffe_build_info as b; i = b(); assert i['gpu'] and '-DUSE_NCCL=ON' in i['cmake_flags'], i" \
    || fail "the venv does not link a CUDA build with NCCL"

.venv/bin/caffe device_query --gpu 0 > "$out/device_query.log" 2>&1 || fail "caffe device_query (log: $out/device_query.log)"
grep -E "Device id|Major revision|Total global memory|Clock rate|Number of multiprocessors" "$out/device_query.log" \
    | sed 's/.*\] /device_query: /' | tee -a "$summary"
python3 tools/caffe_build.py unit-tests > "$out/unit-tests.log" 2>&1 || fail "Caffe's unit tests (log: $out/unit-tests.log)"
say "unit tests: $(grep -E '^\[  PASSED  \]' "$out/unit-tests.log")"

# 3. training: the tiny learnable lists of tests/test_train.py, 50 iterations each way
.venv/bin/python - "$out" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.test_train import write_list
out = Path(sys.argv[1]) / "train-data"
out.mkdir(parents=True, exist_ok=True)
write_list(out, "train", 4, seed=0), write_list(out, "val", 2, seed=1)
EOF
for device in cpu gpu; do
    extra=(); [ $device = gpu ] && extra=(--gpu 0)
    .venv/bin/emotiw train sse_holonet_3conv-s_concat --train "$out/train-data/train.txt" --val "$out/train-data/val.txt" \
        --out "$out/train-$device" --max-iter 50 --batch-size 8 --test-batch-size 7 --test-iter 2 --test-interval 25 \
        --snapshot 50 --display 1 --input-size 48 "${extra[@]}" > "$out/train-$device.txt" 2>&1 \
        || fail "emotiw train on the $device (log: $out/train-$device.txt)"
    say "train $device: $(grep -o 'caffe train: .*' "$out/train-$device.txt" | head -1)"
done
.venv/bin/python - "$out" <<'EOF' | tee -a "$summary"
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(device):
    with open(out / f"train-{device}" / "curves.csv") as handle:
        return {int(r["iteration"]): float(r["value"]) for r in csv.DictReader(handle)
                if r["phase"] == "train" and r["name"] == "total_loss"}
cpu, gpu = losses("cpu"), losses("gpu")
assert cpu.keys() == gpu.keys() and len(cpu) >= 50, (len(cpu), len(gpu))
worst = max(cpu, key=lambda i: abs(cpu[i] - gpu[i]) / max(1.0, abs(cpu[i])))
error = abs(cpu[worst] - gpu[worst]) / max(1.0, abs(cpu[worst]))
print(f"train losses GPU vs CPU, {len(cpu)} iterations: largest difference {error:.2e} at iteration {worst} "
      f"(CPU {cpu[worst]:.6f}, GPU {gpu[worst]:.6f}): {'PASS' if error <= 1e-4 else 'FAIL'}")
sys.exit(error > 1e-4)
EOF

# 4. deploy nets, forward and backward on seeded weights, GPU 0 against the CPU
nets=(sse_holonet_3conv-s_concat sse_densenet121_3conv-s_concat sse_resnet50_4conv-c_concat dsn_resnet50 vgg_face fer2013_mini_xception)
.venv/bin/python tests/caffe_outputs.py "$out/scores-cpu" --batch 8 "${nets[@]}"
.venv/bin/python tests/caffe_outputs.py "$out/scores-gpu" --batch 8 --gpu "${nets[@]}"
.venv/bin/python - "$out" "${nets[@]}" <<'EOF' | tee -a "$summary"
import sys
from pathlib import Path
import numpy as np
out, names = Path(sys.argv[1]), sys.argv[2:]
failed = False
for name in names:
    cpu, gpu = (dict(np.load(out / f"scores-{device}" / f"{name}.npz")) for device in ("cpu", "gpu"))
    errors = {key: float(np.abs(cpu[key] - gpu[key]).max() / max(np.abs(cpu[key]).max(), 1e-30))
              for key in cpu if key != "caffe"}
    forward = max(v for k, v in errors.items() if k.startswith("forward/"))
    worst = max(errors, key=errors.get)
    failed |= errors[worst] > 1e-4
    print(f"{name} GPU vs CPU: scores {forward:.2e}, worst {worst} {errors[worst]:.2e}: "
          f"{'PASS' if errors[worst] <= 1e-4 else 'FAIL'}")
sys.exit(failed)
EOF

# CAFFE_GPU=0: with a driver present, a plain `make install` would choose the CUDA build
CAFFE_GPU=0 make install > "$out/install-cpu.log" 2>&1 || fail "make install of the CPU build (log: $out/install-cpu.log)"
say "the venv links the CPU build again; all GPU checks passed in $(( $(date +%s) - start )) s"
