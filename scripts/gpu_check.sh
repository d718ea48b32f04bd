#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, for a machine with an NVIDIA GPU, its driver and nvcc, in one go (about
# 9 minutes on 16 cores; the CUDA build is the long pole: all cores, the GPU's own architecture only):
#   1. the CUDA build with cuDNN 9 and NCCL: `CAFFE_GPU=1 CAFFE_CUDA_ARCH=<this GPU> make install` (timed),
#   2. `caffe device_query` of GPU 0, `emotiw doctor` (names cuDNN), and Caffe's own suites for the layers
#      on cuDNN (convolution, deconvolution, pooling, softmax, LRN, ReLU/sigmoid/tanh) and im2col, CPU
#      and GPU cases with their gradient checks,
#   3. 50 iterations of `emotiw train --gpu 0` (deterministic cuDNN algorithms) against the same run on
#      the CPU: equal losses within 1e-4; with several GPUs also `--gpu all` (NCCL),
#   4. forward and backward of every registered deploy net on GPU 0 against the CPU
#      (tests/caffe_outputs.py), within 1e-4,
#   5. bench rows (bench/gpu.py): HoloNet, SSE-DenseNet-121, DSN-ResNet-50 and VGG-Face, inference at
#      batch 1 and 64 and training at 32 and 64, with cuDNN, without it and PyTorch on the same card
#      where the bench environment (or TORCH_PYTHON) has PyTorch with CUDA, with peak GPU memory,
# then `CAFFE_GPU=0 make install`, so that the venv links the CPU build as before. Steps 3 and 4 run the
# CPU side with the same CUDA build in CPU mode, so that only the device differs.
# Usage: scripts/gpu_check.sh [OUT]   (default OUT: gpu-check/; the summary is OUT/summary.txt)
# Offline machines: the wheels (cuBLAS, cuRAND, NCCL, cuDNN) and Debian's caffe source must be in pip's
# cache and CAFFE_SRC beforehand (docs/gpu.md).
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
step() { say "$1: $(( $(date +%s) - start )) s since the start"; }
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | tr -d '. ')
CAFFE_GPU=1 CAFFE_CUDNN=1 CAFFE_CUDA_ARCH=$arch make install > "$out/install-gpu.log" 2>&1 \
    || fail "CAFFE_GPU=1 make install (log: $out/install-gpu.log)"
step "CUDA build (sm_$arch) and install ($(grep -o 'caffe-[0-9a-f]*' "$out/install-gpu.log" | head -1))"
.venv/bin/python -c "from emotiw.caffe.env import caffe_build_info as b; i = b(); assert i['gpu'] and '-DUSE_NCCL=ON' in i['cmake_flags'] and i.get('cudnn'), i" \
    || fail "the venv does not link a CUDA build with cuDNN and NCCL"
.venv/bin/emotiw doctor > "$out/doctor.txt" 2>&1 || fail "emotiw doctor (output: $out/doctor.txt)"
grep -E "^(caffe build|cudnn) " "$out/doctor.txt" | sed 's/^/doctor: /' | tee -a "$summary"

.venv/bin/caffe device_query --gpu 0 > "$out/device_query.log" 2>&1 || fail "caffe device_query (log: $out/device_query.log)"
grep -E "Device id|Major revision|Total global memory|Clock rate|Number of multiprocessors" "$out/device_query.log" \
    | sed 's/.*\] /device_query: /' | tee -a "$summary"
python3 tools/caffe_build.py unit-tests > "$out/unit-tests.log" 2>&1 || fail "Caffe's unit tests (log: $out/unit-tests.log)"
say "unit tests: $(grep -E '^\[  PASSED  \]' "$out/unit-tests.log"), of which cuDNN: $(grep -c 'OK \] CuDNN' "$out/unit-tests.log")"
step "unit tests"

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
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
devices=(cpu gpu); [ "$gpus" -gt 1 ] && devices+=(all)
for device in "${devices[@]}"; do
    extra=(); [ $device = gpu ] && extra=(--gpu 0); [ $device = all ] && extra=(--gpu all)
    CAFFE_CUDNN_DETERMINISTIC=1 .venv/bin/emotiw train sse_holonet_3conv-s_concat --train "$out/train-data/train.txt" --val "$out/train-data/val.txt" \
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
if (out / "train-all").exists():
    print(f"train --gpu all: {len(losses('all'))} iterations, final loss {losses('all')[max(losses('all'))]:.6f}")
assert cpu.keys() == gpu.keys() and len(cpu) >= 50, (len(cpu), len(gpu))
worst = max(cpu, key=lambda i: abs(cpu[i] - gpu[i]) / max(1.0, abs(cpu[i])))
error = abs(cpu[worst] - gpu[worst]) / max(1.0, abs(cpu[worst]))
print(f"train losses GPU vs CPU, {len(cpu)} iterations: largest difference {error:.2e} at iteration {worst} "
      f"(CPU {cpu[worst]:.6f}, GPU {gpu[worst]:.6f}): {'PASS' if error <= 1e-4 else 'FAIL'}")
sys.exit(error > 1e-4)
EOF

# 4. deploy nets, forward and backward on seeded weights, GPU 0 against the CPU
step "training"
read -r -a nets <<< "$(.venv/bin/python -c 'from emotiw import nets; print(" ".join(nets.names()))')"
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

step "CPU/GPU agreement of ${#nets[@]} nets"

# 5. bench rows against PyTorch on the same card
.venv/bin/python -m bench.gpu "$out/bench" --reference-python "${TORCH_PYTHON:-bench/.venv-ref/bin/python}" \
    --repeats 3 --warmup 1 > "$out/bench.log" 2>&1 || fail "bench/gpu.py (log: $out/bench.log)"
cat "$out/bench/gpu.md" >> "$summary"
step "bench rows"

# CAFFE_GPU=0: with a driver present, a plain `make install` would choose the CUDA build
CAFFE_GPU=0 make install > "$out/install-cpu.log" 2>&1 || fail "make install of the CPU build (log: $out/install-cpu.log)"
say "the venv links the CPU build again; all GPU checks passed in $(( $(date +%s) - start )) s"
