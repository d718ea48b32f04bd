"""One pycaffe inference figure measured in a process of its own: with another Caffe build (`bench
--baseline-caffe PREFIX`), or with ours under other settings (the memory rows: CAFFE_DNNL).

Run by bench.bench, for a baseline with PYTHONPATH=PREFIX/lib/python3/dist-packages ahead of the
venv's own pycaffe, so that `import caffe` loads that build (its libcaffe comes from PREFIX by rpath); prints
{"caffe": pycaffe's path, "blas": its BLAS and kernels, "rates": [...], "peak_rss_mb": the process's
peak resident memory}. The thread settings come from the environment.
"""

import json
import sys

from bench.bench import Plan, measure, runtime_forward
from emotiw.caffe.env import CaffeBLAS


def main():
    job = json.loads(sys.argv[1])
    plan = Plan(repeats=job["repeats"], warmup=job["warmup"])
    step = runtime_forward("pycaffe", job["deploy"], job["weights"], job["batch"], job["size"], job["fold"])
    import caffe

    blas = CaffeBLAS()
    rates = measure(step, job["batch"], plan)
    print(json.dumps({"caffe": caffe.__file__, "blas": f"{blas.config} ({blas.core})", "rates": rates,
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb():
    """This process's peak resident memory: VmHWM, which exec starts anew (getrusage's ru_maxrss
    keeps the forking parent's, the whole bench's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":
    main()
