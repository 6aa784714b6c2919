#!/usr/bin/env bash
# The CPU profile end to end on the real AdrenalMNIST3D file, in two steps that can run apart:
#   search   the search of studies/adrenalmnist3d-cpu.toml with 2 CPU workers, its wall time printed
#   retrain  its best trial (highest val AUC) retrained with 3 seeds for EPOCHS epochs at batch BATCH
#            on the whole train split, tested, and set beside ResNet-18/50+3D's published numbers
#   manifest someone's own scans in their first hour: the real volumes written out as one NIfTI file
#            each plus a labels CSV ("normal"/"hyperplasia", the file's own splits), then a 10-trial
#            `nas3d search --dataset labels.csv --cpu` (--cpu picks the CPU profile) with 2 workers,
#            its wall time printed
#
#   bash bench/cpu_profile.sh search   ../shared/data
#   bash bench/cpu_profile.sh retrain  ../shared/data [EPOCHS=10] [BATCH=32]
#   bash bench/cpu_profile.sh manifest ../shared/data [N_TRIALS=10]
#
# Everything goes under storage/cpu-profile/ (git-ignored); a second `search` resumes the same study.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: bash bench/cpu_profile.sh search|retrain|manifest DATA_ROOT [EPOCHS|N_TRIALS] [BATCH]}
data_root=${2:?usage: bash bench/cpu_profile.sh search|retrain|manifest DATA_ROOT [EPOCHS|N_TRIALS] [BATCH]}
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
manifest)
    n_trials=${3:-10}
    scans="$work/adrenal-nifti"
    .venv/bin/python - "$data_root/adrenalmnist3d.npz" "$scans" <<'PYTHON'
import sys
from pathlib import Path

import nibabel
import numpy as np

# One NIfTI per volume (1 mm isotropic, identity affine: RAS as stored) and a labels CSV with class
# names, as a clinic's export would look; the npz's own split is kept in the split column.
source, out = Path(sys.argv[1]), Path(sys.argv[2])
if (out / "labels.csv").exists():
    sys.exit(0)
(out / "volumes").mkdir(parents=True, exist_ok=True)
names = {0: "normal", 1: "hyperplasia"}
rows = ["image,label,split"]
with np.load(source) as npz:
    for split in ("train", "val", "test"):
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
        for index, (image, label) in enumerate(zip(images, labels)):
            path = f"volumes/{split}-{index:04d}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), np.eye(4)), out / path)
            rows.append(f"{path},{names[int(label)]},{split}")
(out / "labels.csv").write_text("\n".join(rows) + "\n")
print(f"cpu_profile: wrote {len(rows) - 1} NIfTI volumes and labels.csv to {out}")
PYTHON
    start=$(date +%s)
    "$nas3d" search --dataset "$scans/labels.csv" --size 28 --cpu --workers 2 --n-trials "$n_trials" \
        --name own-scans-cpu --storage "sqlite:///$PWD/$work/manifest.db"
    echo "cpu_profile: manifest search wall time $(( $(date +%s) - start )) s on $(nproc) cores"
    ;;
*)
    echo "cpu_profile: unknown step '$step'; use search, retrain or manifest" >&2
    exit 2
    ;;
esac
