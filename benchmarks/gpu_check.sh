#!/usr/bin/env bash
# The GPU check: proves the sweep's GPU path (batched trials on CUDA, recorded to MLflow) and measures it,
# in one run on a CUDA machine (README, "Batched trials", GPU rows). Usage, from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      # default OUTDIR: benchmarks/out/gpu
#
# Needs a Python whose torch sees a GPU, with pytorch-lightning, mlflow and optuna importable (the
# project's own .venv with a CUDA torch, or any environment with those on PYTHONPATH); PYTHON picks it
# (default python3). Each stage has its own time limit and a failed stage does not stop the next one. The
# default run (the store's write rate, the trials per hour, where a recorded stack's time goes, LSTM's
# looped against its fused kernel) took 395 s on one H200 without its last two stages;
# GPU_CHECK_ALL=1 adds the stages measured in earlier sessions (a smoke sweep with its record checked, the
# batched update, a host profile, kernels, training throughput), about 6 minutes more when time allows
# (README, "Batched trials", "On a GPU"). Everything it prints is also in OUTDIR/log.txt, and the raw rows
# are in OUTDIR/*.json.
set -u -o pipefail
OUT_DIR=${1:-benchmarks/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
elapsed() { echo $(($(date +%s) - START)); }
stage() { echo; echo "=== [$(elapsed) s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc
$PY -c "import os, tempfile, time
with tempfile.NamedTemporaryFile() as f:
    t = time.perf_counter()
    for _ in range(50):
        f.write(b'x' * 4096); f.flush(); os.fsync(f.fileno())
    print(f'fsync of a 4 KiB append in {tempfile.gettempdir()}: {(time.perf_counter() - t) / 50 * 1000:.2f} ms')" || true
timeout 120 $PY -c "import torch, pytorch_lightning as pl, mlflow, optuna, sqlalchemy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('lightning', pl.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__, 'sqlalchemy', sqlalchemy.__version__)" || exit 1

stage "the MLflow sqlite store under 12 writers and a reader: rollback journal against WAL (benchmarks/store_bench.py)"
timeout -k 10 170 $PY -m benchmarks.store_bench 12 30 2>&1 | grep "^{" || echo "(stopped)"

# trials per hour (same points, the default sweep, seed 0): one worker with one trial at a time (the
# baseline of the 20x target, README "Batched trials"), then the defaults of a GPU machine (12 workers x
# trials_per_worker 32) twice, rated over a fixed window (W:K:N:S: stopped after S seconds, the trials
# finished by then), so each comes back with a rate and the two show the window's spread. 100 s windows:
# each entry took about 124 s in session 3; a 220 s window did not finish within 280 s.
for entry in "1:1:24" "12:32:2048:100" "12:32:2048:100"; do
  if [ "$(elapsed)" -gt 420 ]; then echo "(skipped $entry: out of time)"; continue; fi
  stage "sweep grid $entry (workers:trials_per_worker:n_trials[:seconds])"
  timeout -k 20 170 $PY -m benchmarks --gpu --only sweep --sweep-grid "$entry" \
    --out "$OUT_DIR/grid_${entry//:/_}_$(elapsed).json" | grep -v '^|' || echo "(entry $entry stopped)"
done

stage "the grid's speed-ups against its first entry (each entry was its own bench call)"
$PY - "$OUT_DIR" <<'EOF' || true
import glob, json, os, sys
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "grid_*.json")), key=os.path.getmtime):
    rows += json.load(open(f))["gpu"]["sweep_grid"]
if rows:
    base, first = rows[0]["trials_per_hour"], rows[0].get("trials_per_hour_from_first_start") or 0.0
    for r in rows:
        fs = r.get("trials_per_hour_from_first_start", 0.0)
        print(f"{r['workers']} workers x K={r['variant'].split()[-1]}: {r['trials']} trials, "
              f"{r['trials_per_hour']:.0f}/h = {r['trials_per_hour'] / base:.2f}x; "
              f"from the first start {fs:.0f}/h = {fs / first if first else float('nan'):.2f}x")
EOF

# where a recorded stack's time goes; with time to spare, also with each figure drawn on a new one (as
# before reused_run_figures; README "On a GPU"), new first, so the figures' share on the card shows both ways
if [ "$(elapsed)" -lt 430 ]; then
  stage "where a recorded 32-member stack's time goes, wall-clock timers (no profiler), new figures then reused"
  timeout -k 10 160 $PY -m benchmarks.stack_bench --split cuda 32 1 2>&1 | grep "^{" || echo "(stopped)"
elif [ "$(elapsed)" -lt 500 ]; then
  stage "where a recorded 32-member stack's time goes, wall-clock timers (no profiler)"
  timeout -k 10 90 $PY -m benchmarks.stack_bench --split cuda 32 2>&1 | grep "^{" || echo "(stopped)"
fi

if [ "$(elapsed)" -lt 540 ]; then
  stage "LSTM members on the GPU: each its own kernel (loop, today's choice) against one fused block-diagonal kernel"
  timeout -k 10 60 $PY -m benchmarks.stack_bench --kernels cuda lstm 32,64 2>&1 | grep "^{" || echo "(stopped)"
fi

if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then  # the stages measured in earlier sessions (README, "On a GPU")
stage "smoke: configs/sweeps/smoke.yaml on the GPU, 2 workers x trials_per_worker 4, then its record checked"
SMOKE=$(mktemp -d)
(cd "$SMOKE" && timeout -k 20 120 $PY -m pipeline sweep --config "$OLDPWD/configs/sweeps/smoke.yaml" \
  trials_per_worker=4) | tail -15
(cd "$SMOKE" && timeout 60 $PY - <<'EOF'
import mlflow, optuna
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
c = MlflowClient("sqlite:///mlflow.db")
exp = c.get_experiment_by_name("sweep-smoke")
runs = c.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'trial'")
st = optuna.load_study(study_name="smoke", storage=JournalStorage(JournalFileBackend("optuna/smoke.journal")))
states = sorted(t.state.name for t in st.trials)
print("trials", len(st.trials), states)
print("trial runs", len(runs), sorted({r.info.status for r in runs}))
print("accelerator params", sorted({r.data.params.get("trainer.accelerator") for r in runs}))
print("metrics per run", sorted({len(r.data.metrics) for r in runs}), "regimes", sorted({r.data.tags.get("regime") for r in runs}))
ok = len(st.trials) == 6 and len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
print("SMOKE", "OK" if ok else "FAILED")
EOF
) || true

stage "the training loop of a 64-member stack, batched update against per-member (tracking off, 100 steps)"
timeout -k 10 120 $PY -m benchmarks.stack_bench --update cuda 64 100 2>&1 | grep "^{" || echo "(stopped)"

if [ "$(elapsed)" -lt 480 ]; then
  stage "where a 32-member stack's time goes on the GPU (cProfile, recorded to sqlite)"
  if timeout -k 10 80 $PY -m benchmarks.stack_bench --profile cuda 32 > "$OUT_DIR/host_profile.txt" 2>&1; then
    head -45 "$OUT_DIR/host_profile.txt" | cut -c1-160
  else
    echo "(profile stopped or failed:)"; tail -5 "$OUT_DIR/host_profile.txt"
  fi
fi

if [ "$(elapsed)" -lt 520 ]; then
  stage "stacked kernels on the GPU (ms per step of K members)"
  timeout -k 10 60 $PY -m benchmarks --gpu --only stack --out "$OUT_DIR/stack.json" || true
fi
if [ "$(elapsed)" -lt 550 ]; then
  stage "training throughput and the profile's cost on the GPU (--quick)"
  timeout -k 10 50 $PY -m benchmarks --gpu --quick --only train,profile --out "$OUT_DIR/train.json" || true
fi
fi
stage "done"
