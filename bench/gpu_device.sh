#!/bin/bash
# One call on the GPU machine (the `device` tool): install what the image lacks from carried wheels, build the
# random-weight models of the real shapes, run the GPU tests, then the GPU benchmark. Output under $OUT.
#   carry: .whl (cffi, pycparser, gguf wheels for cp312) and edgellm/_native.abi3.so (built here; abi3)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -e edgellm/quant ] || ln -s ../quant edgellm/quant   # what the package-dir mapping does when installed
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.runtimeGetVersion())"
M=/tmp/models; mkdir -p $M
for s in ${SHAPES:-smollm2-135m-q4_0 smollm2-135m-q4_1 smollm2-135m-f16 gemma3-270m-q4_k_m}; do
  [ -f $M/$s.gguf ] || python3 bench/random_weights.py build bench/shapes/$s.json $M/$s.gguf || exit 1
done
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py ${PYTEST_ARGS} 2>&1 | tee $OUT/test_cuda.log | tail -40
fi
if [ "${BENCH:-1}" = 1 ]; then
  python3 bench/bench_cuda.py $(for s in ${SHAPES:-smollm2-135m-q4_0 smollm2-135m-q4_1 smollm2-135m-f16 gemma3-270m-q4_k_m}; do echo $M/$s.gguf; done) \
    -r ${REPS:-5} ${BENCH_ARGS} --json $OUT/bench_cuda.json 2>&1 | tee $OUT/bench_cuda.log | tail -12
fi
if [ "${PROFILE:-0}" = 1 ]; then
  python3 bench/bench_cuda.py --profile $(for s in ${SHAPES:-smollm2-135m-q4_0 gemma3-270m-q4_k_m}; do echo $M/$s.gguf; done) 2>&1 | tee $OUT/profile.log | tail -60
fi
if [ "${NCU:-0}" = 1 ]; then
  for s in ${NCU_SHAPES:-smollm2-135m-q4_0}; do
    ncu --metrics gpu__time_duration.sum --csv python3 bench/gpu_kernel_times.py $M/$s.gguf > $OUT/ncu_$s.csv 2> $OUT/ncu_$s.err
    echo "== ncu $s"; python3 bench/gpu_kernel_times.py --sum $OUT/ncu_$s.csv 2>&1 | tail -20
  done
fi
if [ "${BASE:-0}" = 1 ]; then   # the same benchmark on the kernels of .gpu/base_cuda (carried), on this machine
  rm -rf /tmp/base && mkdir -p /tmp/base && cp -r edgellm bench quant /tmp/base/ && cp .gpu/base_cuda/*.py .gpu/base_cuda/*.cu /tmp/base/edgellm/backends/cuda/ \
    && mv /tmp/base/edgellm/backends/cuda/bench_cuda.py /tmp/base/bench/bench_cuda.py
  (cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base python3 bench/bench_cuda.py $(for s in ${SHAPES:-smollm2-135m-q4_0 smollm2-135m-q4_1 smollm2-135m-f16 gemma3-270m-q4_k_m}; do echo $M/$s.gguf; done) \
    -r ${REPS:-5} --json $OUT/bench_base.json 2>&1 | tee $OUT/bench_base.log | tail -6)
fi
if [ "${PARTIAL:-0}" = 1 ]; then   # issue 15's partial-offload bar: -ngl 15 of 30 beside the CPU alone (the host's cores)
  python3 bench/bench_cuda.py $M/smollm2-135m-q4_1.gguf -ngl 15 --cpu -r ${REPS:-3} --json $OUT/bench_partial.json 2>&1 | tee $OUT/bench_partial.log | tail -5
fi
