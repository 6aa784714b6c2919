#!/usr/bin/env bash
# GPU check: one command, under 8 minutes on one GPU, nothing installed from the network.
#   1. the CUDA-marked tests;
#   2. the training-throughput benchmark on CUDA (seed organmnist3d architecture, 28^3);
#   3. a 3-minute search on synthetic 28^3 data (OrganMNIST3D's shape and search subset), two
#      workers on the GPU, stopped by SIGTERM, then counted;
# then a short table: samples/s, ratio, trials completed, GPU memory peak.
#
#   bash bench/gpu_check.sh                      # on a machine with a GPU
#   GPU_CHECK_DEVICE=cpu SEARCH_SECONDS=20 bash bench/gpu_check.sh   # dry run of the script's plumbing
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SEARCH_SECONDS=${SEARCH_SECONDS:-180}
WORK=${OUT:-$(mktemp -d)}
mkdir -p "$WORK"
echo "gpu_check: device=$DEVICE python=$($PY -c 'import sys; print(sys.version.split()[0])') results in $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. CUDA tests (skipped, not failed, where there is no GPU)
$PY -m pytest -q -m cuda tests 2>&1 | tee "$WORK/cuda_tests.log" | tail -n 3
tests_line=$(grep -E "passed|failed|skipped|error" "$WORK/cuda_tests.log" | tail -n 1)

# 2. throughput: nas3d loop vs the seed's DataLoader loop, same model and data
timeout 150 $PY bench/train_throughput.py --device "$DEVICE" --model seed-organmnist3d --epochs 3 \
    --json "$WORK/throughput.json" 2>&1 | tail -n 8

# 3. a timed search; nvidia-smi samples memory meanwhile
mem_log="$WORK/gpu_memory.csv"
if command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$mem_log" &
    smi_pid=$!
fi
export NAS3D_HOME="$WORK/home"
launch=(--workers-per-gpu 2)
[ "$DEVICE" = cpu ] && launch=(--cpu --workers 2)
timeout -s TERM -k 30 "$SEARCH_SECONDS" $PY -m nas3d search --dataset synthetic --size 28 --name gpu-check \
    --n-trials 10000 --set data.synthetic_classes=11 --set data.synthetic_samples=972 \
    --heartbeat-interval 10 "${launch[@]}" >"$WORK/search.log" 2>&1
[ -n "${smi_pid:-}" ] && kill "$smi_pid" 2>/dev/null
$PY -m nas3d status --study-name gpu-check >"$WORK/status.txt" 2>&1
head -n 12 "$WORK/status.txt"

$PY - "$WORK" "$tests_line" "$SEARCH_SECONDS" <<'PY'
import json, pathlib, sys
import optuna
from nas3d.storages import make_storage
work, tests_line, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [("CUDA tests", tests_line.strip() or "-")]
try:
    t = json.loads((work / "throughput.json").read_text())
    r = t["results"]
    rows += [
        ("device", t["config"]["device_name"]),
        ("DataLoader loop, samples/s", f"{r['dataloader']['samples_per_second']:.0f}"),
        ("nas3d loop, samples/s", f"{r['nas3d']['samples_per_second']:.0f}"),
        ("ratio nas3d / DataLoader", f"{t['ratio']:.2f}x"),
        ("GPU utilisation (nas3d loop)", f"{r['nas3d']['gpu_utilisation_percent'] or 0:.0f}%"),
    ]
except (OSError, KeyError, ValueError) as e:
    rows.append(("throughput", f"no result ({e})"))
study = optuna.load_study(study_name="gpu-check", storage=make_storage(None))
states = [t.state.name for t in study.get_trials(deepcopy=False)]
trained = sum(1 for t in study.get_trials(deepcopy=False)
              if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs)
rows += [(f"search {seconds}s: trials complete", str(states.count("COMPLETE"))),
         ("  of which trained (not duplicates)", str(trained)),
         ("  failed / pruned / left running", f"{states.count('FAIL')} / {states.count('PRUNED')} / {states.count('RUNNING')}")]
mem = work / "gpu_memory.csv"
if mem.exists() and mem.read_text().split():
    rows.append(("GPU memory peak during search", f"{max(int(v) for v in mem.read_text().split())} MiB"))
width = max(len(k) for k, _ in rows)
print("\n| check | result |\n|---|---|")
for k, v in rows:
    print(f"| {k.ljust(width)} | {v} |")
PY
