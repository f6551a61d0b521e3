#!/usr/bin/env bash
# The exactness guarantees and the mask speed, checked on whatever accelerator JAX finds.
#
#   scripts/device_check.sh [OUTDIR]        # ~4 min on one H200; works on CPU too
#
# Runs the test files whose results must be the same bits on every backend (masks, formats,
# compression, QAT, the straight-through family, STEP, the pruners, DST, bf16 params, GPTQ's
# grids) with the backend named in pytest's header, prints one verdict line per file, then
# `scripts/bench.py --only masks`. The tests are the CPU suite, unchanged: nothing in them
# assumes a backend. Output (log, junit XML, bench table) goes to OUTDIR.
#
# Environment: PYTHON (default python3), JOBS (pytest-xdist workers when xdist is installed;
# default: half the CPU cores, at most 8), TEST_TIMEOUT / BENCH_TIMEOUT (seconds).
# On a fresh machine without jaxprune installed, run it from a checkout: the checkout is put
# on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/jaxprune-device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Several test processes share one accelerator: no process may grab most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.10}
FILES=(tests/test_masks.py tests/test_quant.py tests/test_compress.py tests/test_qat.py
       tests/test_ste.py tests/test_step.py tests/test_pruning.py tests/test_progressive.py
       tests/test_dst.py)
for f in tests/test_bf16.py tests/test_nvfp4.py tests/test_qat_grid.py tests/test_quant_conventions.py; do
  [[ -f $f ]] && FILES+=("$f")
done
# GPTQ and SparseGPT: only the tests of exact results (their reference comparisons are float
# algorithms, Cholesky included, that no backend reproduces to the last bit).
for t in test_gptq_result_is_exactly_representable test_sparsegpt_joint_int_keeps_the_scale_entry; do
  FILES+=("tests/test_oneshot_layers.py::$t")
done
CORES=$(nproc)
JOBS=${JOBS:-$(( CORES / 2 > 8 ? 8 : (CORES / 2 < 1 ? 1 : CORES / 2) ))}
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null && (( JOBS > 1 )); then XDIST=(-n "$JOBS"); fi

"$PY" -c "import jax; d = jax.devices(); print(f'device_check: jax {jax.__version__}, backend {jax.default_backend()}, {len(d)} x {d[0].device_kind}')"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-270}" "$PY" -m pytest "${FILES[@]}" "${XDIST[@]}" --tb=line -rf -q \
  -p no:cacheprovider --junitxml "$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log" | tail -n 40
echo "device_check: tests took $(( $(date +%s) - start )) s"
"$PY" - "$OUT/junit.xml" "${FILES[@]}" <<'PYEOF'
import collections, sys, xml.etree.ElementTree as ET
path = sys.argv[1]
files = list(dict.fromkeys(f.split("::")[0] for f in sys.argv[2:]))  # node ids: their file
stats = collections.defaultdict(lambda: collections.Counter())
failed = collections.defaultdict(list)
try:
  root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as e:
  sys.exit(f"device_check: no test results ({e}); the run timed out or crashed: see pytest.log")
for case in root.iter("testcase"):
  module = case.get("classname", "").split(".")
  file = "tests/" + (module[1] if len(module) > 1 else module[0]) + ".py"
  kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
  stats[file][kind] += 1
  if kind in ("failure", "error"):
    failed[file].append(case.get("name"))
bad = 0
for file in files:
  s = stats.get(file)
  if not s:
    print(f"{file}: NOT RUN"); bad += 1; continue
  verdict = "FAIL" if failed[file] else "ok"
  bad += bool(failed[file])
  extra = f"; failed: {', '.join(failed[file][:6])}" if failed[file] else ""
  print(f"{file}: {verdict} ({s['passed']} passed, {s['failure'] + s['error']} failed, "
        f"{s['skipped']} skipped{extra})")
print(f"device_check: {'ALL EXACTNESS TESTS PASSED' if not bad else f'{bad} FILE(S) FAILED'}")
PYEOF
verdict=$?
timeout "${BENCH_TIMEOUT:-120}" "$PY" scripts/bench.py --only masks 2>&1 | tee "$OUT/bench_masks.txt"
exit $verdict
