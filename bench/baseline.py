"""One pycaffe inference figure measured with another Caffe build (`bench --baseline-caffe PREFIX`).

Run by bench.bench with PYTHONPATH=PREFIX/lib/python3/dist-packages ahead of the venv's own pycaffe,
so that `import caffe` loads that build (its libcaffe comes from PREFIX by rpath); prints
{"caffe": pycaffe's path, "blas": its BLAS and kernels, "rates": [...]}. The thread settings come from the environment.
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
    print(json.dumps({"caffe": caffe.__file__, "blas": f"{blas.config} ({blas.core})",
                      "rates": measure(step, job["batch"], plan)}))


if __name__ == "__main__":
    main()
