#!/usr/bin/env bash
# The scaling study on one accelerator: BPE tokens, the `accelerator` sweep, the fits.
#
#   scripts/device_sweep.sh [OUTDIR]          # default OUTDIR: results/scaling_accelerator
#
# 1. scripts/prepare_data.py: a 4,096-token byte-level BPE corpus of the Python standard
#    library (train.bin / val.bin / tokenizer.json), unless OUTDIR/tokens already holds one;
# 2. scripts/sweep.py --preset accelerator: 63 runs in one process, resumable (rerun the
#    script after an interruption: finished runs are read back), runs of one size and method
#    sharing one compiled program through JAX's persistent cache;
# 3. scripts/fit_scaling_law.py: Chinchilla with N_final and N_avg, Frantar et al.'s sparse
#    form, leave-one-size-out, bootstrap intervals, the seed noise floor, plots.
# Everything lands in OUTDIR (sweep.csv, scaling_report.md, the PNGs, runs/ with each run's
# report). Needs jax with an accelerator, tokenizers, matplotlib; PYTHON selects the
# interpreter (default python3). The checkout is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/scaling_accelerator}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT"
"$PY" -c "import jax; d = jax.devices(); print(f'device_sweep: jax {jax.__version__}, {jax.default_backend()}, {len(d)} x {d[0].device_kind}')"
start=$(date +%s)
if [[ ! -f "$OUT/tokens/train.bin" ]]; then
  "$PY" scripts/prepare_data.py --out "$OUT/tokens" --vocab-size 4096
fi
"$PY" scripts/sweep.py --preset accelerator --data "$OUT/tokens" --out "$OUT"
echo "device_sweep: sweep done in $(( $(date +%s) - start )) s"
"$PY" scripts/fit_scaling_law.py "$OUT/sweep.csv" --out "$OUT"
echo "device_sweep: all done in $(( $(date +%s) - start )) s; results in $OUT"
