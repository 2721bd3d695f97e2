#!/usr/bin/env bash
# One prepared GPU session, sized for about 10 minutes on one H100/H200:
#   1. the CUDA tests (they skip on a machine without a GPU),
#   2. Table 2 on the GPU (the paper's protocol: T = 1000, K = 10 / 50 / 100, BPTT vs
#      Neumann-RBP, wall time and torch.cuda.max_memory_allocated),
#   3. Table 1's paper-model rows (six methods, 10 seeds batched in one model, 2000 epochs) on
#      Cora, then Pubmed, as far as the time allows; the run resumes where it stopped.
# Each step has its own time limit (TEST_S, TABLE2_S, TABLE1_S seconds per data set); STEPS
# picks the steps (default "tests table2 table1"), so one session can be split over two calls
# of at most 10 minutes each; T1_DATASETS the data sets (default "cora pubmed"). What finished is packed into $OUT as at most 8 files.
#
#   OUT=/tmp/out DATA=/path/to/data bash benchmarks/gpu_session.sh       # DATA holds mnist/
#   DEVICE=cpu QUICK=1 OUT=/tmp/out DATA=../shared/data bash benchmarks/gpu_session.sh
#                                                              # the same script, tiny, on a CPU
# DATA must hold mnist/t10k-*-idx*-ubyte.gz and planetoid/ind.pubmed.* (Cora ships with rbp).
# On a GPU machine that receives a copy of the checkout, put those files in a folder of the
# checkout that git ignores and pass DATA=<that folder>; RUNS=results/citation/full continues
# the tracked CPU runs (their finished seeds, and those of the workers' <dataset>-* folders
# beside them, are kept; seed_batch=10 regroups the rest; the data may lie elsewhere than on
# the CPU machine: checkpoints compare the data's SHA-256, not the folder).
# Without an installed package the script runs the source tree (PYTHONPATH=src).
# A setting it cannot use (an unknown step or data set, QUICK other than 1 / 0, a time limit
# that is not a positive integer, a DATA folder without the mnist/ or planetoid/ a step reads)
# is refused in one line, exit 2, before anything runs.
set -u
: "${OUT:?set OUT to the folder that receives the results}"
: "${DATA:?set DATA to the folder holding mnist/ and planetoid/}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-tests table2 table1}"
QUICK="${QUICK:-}"
# refuse, in one line and before any work, a setting that would silently skip or break a step
die() { echo "gpu_session.sh: error: $*" >&2; exit 2; }
for step in $STEPS; do
    case "$step" in tests|table2|table1) ;;
        *) die "STEPS: unknown step '$step' (valid: tests table2 table1)";; esac
done
[ -n "${STEPS// /}" ] || die "STEPS is empty; give some of: tests table2 table1"
case "$QUICK" in ""|0) QUICK= ;; 1) ;;
    *) die "QUICK='$QUICK' (valid: 1 for the tiny sizes, 0 or unset for the full ones)";; esac
for limit in TEST_S TABLE2_S TABLE1_S; do
    value="${!limit:-1}"
    case "$value" in ''|*[!0-9]*|0) die "$limit='$value' is not a positive number of seconds";;
    esac
done
for ds in ${T1_DATASETS:-cora pubmed}; do
    case "$ds" in cora|pubmed|citeseer) ;;
        *) die "T1_DATASETS: unknown data set '$ds' (valid: cora pubmed citeseer)";; esac
done
[ -d "$DATA" ] || die "DATA=$DATA is not a folder; point it at the folder holding mnist/ and planetoid/"
case " $STEPS " in *" table2 "*)
    [ -d "$DATA/mnist" ] || die "DATA=$DATA has no mnist/ folder, which step table2 reads";;
esac
case " $STEPS " in *" table1 "*)
    [ -d "$DATA/planetoid" ] || die "DATA=$DATA has no planetoid/ folder, which step table1 reads";;
esac
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
log="$OUT/session.log"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

say "device $DEVICE; $($PY -c 'import torch; print("torch", torch.__version__, "cuda",
    torch.cuda.is_available() and torch.cuda.get_device_name(0))')"

has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

# 1. CUDA tests (and the device plumbing on the CPU)
if has tests; then
    timeout "${TEST_S:-90}" $PY -m pytest -q -rs -p no:cacheprovider -k "cuda or device" \
        tests/experiments/test_citation_seeds.py tests/core tests/benchmarks \
        >"$OUT/tests.log" 2>&1
    say "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))"
fi

# 2. Table 2 on the device (the release variant: the paper's implementation choices)
if has table2; then
    t2=(--device "$DEVICE" --data-dir "$DATA/mnist" --out "$OUT/table2" --no-scaling
        --variants release)
    [ -n "$QUICK" ] && t2+=(--quick)
    timeout "${TABLE2_S:-180}" $PY benchmarks/table2.py "${t2[@]}" >"$OUT/table2.log" 2>&1
    say "table 2: exit $?"
fi

# 3. Table 1, paper model, seeds batched, in RUNS/<dataset> (default $OUT/citation); a run
#    found there resumes (carry results/citation/full and set RUNS=results/citation/full to go
#    on from the CPU runs: their finished seeds are kept)
has table1 || STEPS_T1=skip
t1=(--device "$DEVICE" --data-dir "$DATA/planetoid" --set "models=[paper]"
    --set "baselines=[logreg]" --set seed_batch=10 --set checkpoint_every=100 --no-progress)
[ -n "$QUICK" ] && t1+=(--quick --set "methods=[bptt,neumann,gmres]" --set num_seeds=3)
for ds in ${T1_DATASETS:-cora pubmed}; do
    [ "${STEPS_T1:-}" = skip ] && break
    dir="${RUNS:-$OUT/citation}/$ds"
    again=()
    [ -f "$dir/results.json" ] && again=(--resume)
    for worker in "$dir"-*; do  # the CPU workers' folders beside it: their finished seeds
        [ -d "$worker" ] && again+=(--reuse-from "$worker")
    done
    timeout -s INT "${TABLE1_S:-150}" $PY -m rbp.runner citation "${t1[@]}" \
        --set "dataset=[$ds]" --out "$dir" "${again[@]}" >>"$OUT/table1.log" 2>&1
    say "table 1 $ds: exit $?"
done

# pack: results come back as at most 8 files
[ -d "$OUT/table2" ] && tar czf "$OUT/table2.tgz" -C "$OUT" table2 && rm -rf "$OUT/table2"
[ -d "${RUNS:-$OUT/citation}" ] && tar czf "$OUT/citation.tgz" -C "${RUNS:-$OUT/citation}" . \
    && rm -rf "$OUT/citation"
say "done; files: $(ls "$OUT" | tr '\n' ' ')"
