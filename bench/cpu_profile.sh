#!/usr/bin/env bash
# The CPU profile end to end on the real AdrenalMNIST3D file, in two steps that can run apart:
#   search   the search of studies/adrenalmnist3d-cpu.toml with 2 CPU workers, its wall time printed
#   retrain  its best trial (highest val AUC) retrained with 3 seeds for EPOCHS epochs at batch BATCH
#            on the whole train split, tested, and set beside ResNet-18/50+3D's published numbers
#
#   bash bench/cpu_profile.sh search  ../shared/data
#   bash bench/cpu_profile.sh retrain ../shared/data [EPOCHS=10] [BATCH=32]
#
# Everything goes under storage/cpu-profile/ (git-ignored); a second `search` resumes the same study.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: bash bench/cpu_profile.sh search|retrain DATA_ROOT [EPOCHS] [BATCH]}
data_root=${2:?usage: bash bench/cpu_profile.sh search|retrain DATA_ROOT [EPOCHS] [BATCH]}
epochs=${3:-10}
batch=${4:-32}
nas3d=.venv/bin/nas3d
[ -x "$nas3d" ] || nas3d=nas3d
work=storage/cpu-profile
mkdir -p "$work"
storage="sqlite:///$PWD/$work/study.db"
study=adrenalmnist3d-28-cpu

case "$step" in
search)
    start=$(date +%s)
    "$nas3d" search --study studies/adrenalmnist3d-cpu.toml --data-root "$data_root" --storage "$storage" \
        --cpu --workers 2
    echo "cpu_profile: search wall time $(( $(date +%s) - start )) s on $(nproc) cores"
    ;;
retrain)
    best=$(.venv/bin/python - "$storage" "$study" <<'EOF'
import sys
import optuna
study = optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])
done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
print(max(done, key=lambda t: (t.values[0], -t.values[1])).number)
EOF
)
    echo "cpu_profile: retraining trial $best ($epochs epochs, batch $batch, seeds 0,42,143)"
    start=$(date +%s)
    "$nas3d" retrain --storage "$storage" --study-name "$study" --trial "$best" --data-root "$data_root" \
        --epochs "$epochs" --batch-size "$batch" --seeds 0,42,143 --device cpu --out "$work/retrain" --force
    echo "cpu_profile: retrain wall time $(( $(date +%s) - start )) s"
    "$nas3d" compare "$work/retrain"
    ;;
*)
    echo "cpu_profile: unknown step '$step'; use search or retrain" >&2
    exit 2
    ;;
esac
