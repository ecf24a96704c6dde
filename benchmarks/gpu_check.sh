#!/usr/bin/env bash
# The GPU check: one prepared command for a lent H100 or H200, under 9 minutes, RESULT lines kept.
#
#   bash benchmarks/gpu_check.sh            (from the repository root; logs also go to $OUT when set)
#
# 1. The full-size train step of both models on their real shapes with random bf16 weights
#    (benchmarks/memory.py --size=full: 1024² + a 1024² control, rank 16, batch 1, gradient
#    checkpointing, regional compile), each against the memory plan: planned peak against
#    torch.cuda.max_memory_allocated, and the step's seconds; fp8 storage beside bf16.
# 2. The fp8-matmul variant, token routing on and off (train.route: tread at ratio 0.5 over blocks 1..-1) and the
#    diffusers reference loop on FLUX.1 Kontext's full shape (benchmarks/train_step.py --config=full --fp8
#    --route=0.5): step seconds, memory and MFU.
# Each part has its own time limit, so one stall cannot take the others' time.
#
# The device machine's image lacks diffusers and fire: carry them as wheels in .whl (prepared here,
# where pip reaches the registries; see benchmarks/README.md) and the first lines install them.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
: >"$LOG"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
status=0
part() {  # part SECONDS COMMAND...: run with a limit, keep the log, remember a failure
  local limit=$1; shift
  echo "== $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -E "^(RESULT|[a-z0-9-]+ +[0-9]|Traceback|[A-Za-z]+Error)"
  local rc=("${PIPESTATUS[@]}")
  [ "${rc[0]}" -eq 0 ] || status=1
}
part 150 python3 benchmarks/memory.py --size=full --model=flux --settings=bf16-ckpt,fp8-ckpt --compile=regional --steps=3
part 150 python3 benchmarks/memory.py --size=full --model=qwen --settings=bf16-ckpt,fp8-ckpt --compile=regional --steps=3
part 220 python3 benchmarks/train_step.py --config=full --dtypes=bfloat16 --fp8 --route=0.5 --steps=3 --warmup=2
echo "RESULT lines:" && grep "^RESULT" "$LOG"
exit $status
