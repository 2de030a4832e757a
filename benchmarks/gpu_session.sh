#!/usr/bin/env bash
# cupydcn on a freshly lent GPU machine, in one call, under a deadline it enforces itself.
#
#   bash benchmarks/gpu_session.sh [OUTPUT_FOLDER]
#
# Stages, in order, with their default budget and the least time they start with (seconds;
# a stage's timeout is its budget or the time left, whichever is less):
#   probe            30   5  GPU, driver, CUDA, CuPy/NVRTC, torch, torchvision, JAX, tools
#   install          30   5  wheels from .whl/ for distributions the machine lacks (pip
#                            --no-index --no-deps --target), then cupydcn's imports
#   check            90  10  python -m cupydcn check (cold NVRTC compilation included)
#   gpu_tests       120  30  python -m pytest -m gpu tests (strict: warnings are errors)
#   gpu_tests_rerun  60  10  the strict run's failures again with warnings shown (-W
#                            default; --lf, modules that failed to collect whole): those that
#                            pass now failed only through warnings, the others are real
#   memcheck         90  20  compute-sanitizer --tool memcheck on check (CuPy's pool off)
#   large_index     120  30  benchmarks/gpu_session/large_index.py: each op past 2^31 elements
#   bench           150  30  python -m pytest benchmarks/ at reduced rounds, in parts (keeps
#                            25 s for the report)
#   report           30   5  benchmarks/report.py --save-results (date_gpu_commit names)
# The budgets add up to more than the deadline: stages that finish early leave time to the
# later ones. A stage is skipped, with its reason, when its precondition fails (no CUDA
# device, no compute-sanitizer, no benchmark JSON, cupydcn does not import) or when less
# than its least time is left before the deadline. The summary table is printed last.
#
# Output folder: $1, else $GPU_SESSION_OUT, else $OUT (the lent machine's), else a new
# temporary folder. It receives few files (a lent machine returns at most 8):
#   summary.md      the table, the environment, the details of what failed
#   session.log     this script's console output, then every stage's log
#   logs.tar.gz     every stage's log, the junit XML files, the benchmark JSON parts
#   results/        <date>_<gpu>_<commit>.{json,md,png} as filed in benchmarks/results/
#
# Environment:
#   GPU_SESSION_DEADLINE=480    overall seconds, this script's own start to its summary
#   GPU_SESSION_RESERVE=10      seconds kept back for the summary and the tarball
#   GPU_SESSION_BUDGET_<STAGE>  a stage's budget (e.g. GPU_SESSION_BUDGET_BENCH=200)
#   GPU_SESSION_SKIP=a,b        stages not to run
#   GPU_SESSION_FORCE=a,b       GPU stages to run even without a CUDA device (gpu_tests,
#                               memcheck, bench: to try the plumbing on a CPU)
#   GPU_SESSION_PYTEST_ARGS     what pytest -m gpu runs (default: tests)
#   GPU_SESSION_BENCH_ROUNDS=10 GPU_SESSION_BENCH_WARMUP=2  GPU_SESSION_BENCH_ARGS=...
#   GPU_SESSION_BENCH_PARTS     ';'-separated pytest -k expressions, run one after another
#   GPU_SESSION_REPORT_ARGS     more options for report.py (e.g. --allow-cpu, --no-png)
#   GPU_SESSION_BENCH_JSON      ';'-separated benchmark JSON files of an earlier run, reported
#                               (and stamped: copies) with whatever the bench stage makes
#   GPU_SESSION_WHEELS          the wheel folder (default: .whl at the repository root)
#   GPU_SESSION_SITE            where wheels are installed (default: a folder in the work dir)
#   GPU_SESSION_RESULTS_DIR     where report.py files the results (default benchmarks/results)
#   CUPYDCN_COMMIT=HEX[-dirty]  the commit, for a copy without .git (git's answer otherwise);
#   CUPYDCN_COMMIT_FILE=PATH    or a file holding it; neither and no git: "nogit"
#   PYTHON=python3              the interpreter
#   TMPDIR                      where the work folder is made (removed at the end, its
#                               logs being in logs.tar.gz; GPU_SESSION_KEEP_WORK=1 keeps it)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/benchmarks/gpu_session/tools.py"
LARGE="$ROOT/benchmarks/gpu_session/large_index.py"
PYTHON=${PYTHON:-python3}

case ${1:-} in
  -h | --help)
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
DEADLINE=${GPU_SESSION_DEADLINE:-480}
RESERVE=${GPU_SESSION_RESERVE:-10}
is_int "$DEADLINE" || { echo "GPU_SESSION_DEADLINE must be whole seconds, not '$DEADLINE'" >&2; exit 2; }
is_int "$RESERVE" || { echo "GPU_SESSION_RESERVE must be whole seconds, not '$RESERVE'" >&2; exit 2; }
SECONDS=0

OUTDIR=${1:-${GPU_SESSION_OUT:-${OUT:-}}}
if [ -z "$OUTDIR" ]; then
  OUTDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_out.XXXXXX")
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || exit 2
LOGS="$WORK/logs"
mkdir -p "$LOGS"
SESSION_LOG="$OUTDIR/session.log"
: >"$SESSION_LOG"
SITE=${GPU_SESSION_SITE:-$WORK/site}
KEEP_WORK=0
[ "${GPU_SESSION_KEEP_WORK:-0}" = 1 ] && KEEP_WORK=1
WHEELS=${GPU_SESSION_WHEELS:-$ROOT/.whl}
RESULTS_DIR=${GPU_SESSION_RESULTS_DIR:-$ROOT/benchmarks/results}
SKIP=",${GPU_SESSION_SKIP:-},"
FORCE=",${GPU_SESSION_FORCE:-},"
read -r -a PYTEST_ARGS <<<"${GPU_SESSION_PYTEST_ARGS:-tests}"
read -r -a BENCH_ARGS <<<"${GPU_SESSION_BENCH_ARGS:-}"
read -r -a REPORT_ARGS <<<"${GPU_SESSION_REPORT_ARGS:-}"
BENCH_ROUNDS=${GPU_SESSION_BENCH_ROUNDS:-10}
BENCH_WARMUP=${GPU_SESSION_BENCH_WARMUP:-2}
BENCH_PARTS=${GPU_SESSION_BENCH_PARTS:-"roi_pool;deform_conv2d and float32;deform_conv2d and float16;deform_conv2d and bfloat16"}

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The copy on a lent machine is not installed: the tree's cupydcn comes first.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 2

STAGES=(probe install check gpu_tests gpu_tests_rerun memcheck large_index bench report)
declare -A ST_STATUS ST_DETAIL ST_TIME ST_BUDGET
STAGE_START=0
STAGE_TIMEOUT=0

say() {
  printf '%s\n' "$*"
  printf '%s\n' "$*" >>"$SESSION_LOG"
}

in_list() { [[ $2 == *",$1,"* ]]; }

time_left() {
  local left=$((DEADLINE - SECONDS - RESERVE))
  ((left < 0)) && left=0
  echo "$left"
}

# The stage's own clock: what is left of its timeout (at least 1 s).
stage_left() {
  local left=$((STAGE_TIMEOUT - (SECONDS - STAGE_START)))
  ((left < 1)) && left=1
  echo "$left"
}

budget_of() { # stage default
  local var
  var="GPU_SESSION_BUDGET_$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"
  local value=${!var:-$2}
  is_int "$value" || value=$2
  echo "$value"
}

# stage_begin NAME DEFAULT_BUDGET MIN_SECONDS [BLOCKED_REASON [KEEP_SECONDS]]: 0 to run the
# stage (with STAGE_TIMEOUT set), 1 when it was recorded as skipped. KEEP_SECONDS are left
# over for a later stage that depends on this one (the report after the benchmarks).
stage_begin() {
  local name=$1 budget min=$3 blocked=${4:-} keep=${5:-0} left
  budget=$(budget_of "$name" "$2")
  ST_BUDGET[$name]=$budget
  STAGE_START=$SECONDS
  if in_list "$name" "$SKIP"; then
    stage_end "$name" skipped "GPU_SESSION_SKIP names it"
    return 1
  fi
  if [ -n "$blocked" ]; then
    stage_end "$name" skipped "$blocked"
    return 1
  fi
  left=$(time_left)
  if ((left - keep < min)); then
    local later=""
    ((keep > 0)) && later=", and ${keep} s for the report after it"
    stage_end "$name" skipped "too little time left (${left} s before the ${DEADLINE} s deadline, less its ${RESERVE} s reserve; needs ${min} s${later})"
    return 1
  fi
  left=$((left - keep))
  STAGE_TIMEOUT=$((budget < left ? budget : left))
  say "==> $name: budget ${budget} s, timeout ${STAGE_TIMEOUT} s, ${left} s left [$(date -u +%H:%M:%S)]"
  printf '### %s (timeout %s s)\n' "$name" "$STAGE_TIMEOUT" >"$LOGS/$name.log"
  return 0
}

# stage_end NAME ok|failed|skipped DETAIL
stage_end() {
  local name=$1 status=$2 detail=${3:-} took
  took=$((SECONDS - STAGE_START))
  ST_STATUS[$name]=$status
  ST_DETAIL[$name]=$(printf '%s' "$detail" | tr '\n|' ' /' | cut -c1-400)
  ST_TIME[$name]=$took
  say "<== $name: $status${detail:+: ${ST_DETAIL[$name]}} (${took} s)"
  if [ "$status" = failed ] && [ -s "$LOGS/$name.log" ]; then
    say "    last lines of $name.log:"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/    | /' | while IFS= read -r line; do say "$line"; done
  fi
}

# run_logged NAME COMMAND...: runs under the stage's remaining time, output appended to
# the stage's log; the command's status, 124 when it ran out of time.
run_logged() {
  local log="$LOGS/$1.log" limit rc
  shift
  limit=$(stage_left)
  printf '$ %s   [timeout %s s]\n' "$*" "$limit" >>"$log"
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  ((rc == 137)) && rc=124
  ((rc == 124)) && printf '!!! timed out after %s s\n' "$limit" >>"$log"
  return "$rc"
}

# The last "RESULT: ..." line a helper printed into a log, without the prefix.
result_of() {
  grep -a '^RESULT: ' "$1" 2>/dev/null | tail -n 1 | sed 's/^RESULT: //'
}

find_sanitizer() {
  local candidate
  if command -v compute-sanitizer >/dev/null 2>&1; then
    command -v compute-sanitizer
    return 0
  fi
  for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
    /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

resolve_commit() {
  local commit="" source=""
  if [ -n "${CUPYDCN_COMMIT:-}" ]; then
    commit=$CUPYDCN_COMMIT source="CUPYDCN_COMMIT"
  elif command -v git >/dev/null 2>&1 && [ -e "$ROOT/.git" ] &&
    commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
    source="git"
    if [ -n "$(git --no-optional-locks -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
      commit="$commit-dirty"
    fi
  elif [ -n "${CUPYDCN_COMMIT_FILE:-}" ] && [ -s "$CUPYDCN_COMMIT_FILE" ]; then
    commit=$(head -n 1 "$CUPYDCN_COMMIT_FILE" | tr -d '[:space:]') source="CUPYDCN_COMMIT_FILE"
  fi
  commit=$(printf '%s' "$commit" | tr '[:upper:]' '[:lower:]')
  if ! [[ $commit =~ ^[0-9a-f]{7,40}(-dirty)?$ ]]; then
    [ -n "$commit" ] && say "commit '$commit' (from $source) is not hex digits: using nogit"
    commit="nogit" source="none (no .git, CUPYDCN_COMMIT or CUPYDCN_COMMIT_FILE)"
  fi
  COMMIT=$commit
  COMMIT_SOURCE=$source
}

# ---------------------------------------------------------------------------- stages
HAVE_GPU=0
GPU_NAME=""
NO_GPU_REASON="not probed"
CUPYDCN_OK=1
GPU_STRICT_RC=""
BENCH_JSONS=()
RESULT_FILES=()

detect_gpu() {
  local line
  local limit
  limit=$(time_left)
  limit=$((limit < 5 ? 5 : (limit > 30 ? 30 : limit)))
  line=$(timeout -k 2 "$limit" "$PYTHON" "$TOOLS" gpu 2>/dev/null | tail -n 1)
  case $line in
    yes\|*)
      HAVE_GPU=1
      GPU_NAME=$(printf '%s' "$line" | cut -d'|' -f2)
      ;;
    no\|*) NO_GPU_REASON=$(printf '%s' "$line" | cut -d'|' -f2-) ;;
    *) NO_GPU_REASON="the GPU probe gave no answer ($PYTHON $TOOLS gpu)" ;;
  esac
}

# The reason a GPU stage cannot run here, or nothing.
gpu_blocked() {
  if ((HAVE_GPU)) || in_list "$1" "$FORCE"; then
    return 0
  fi
  echo "$NO_GPU_REASON"
}

cupydcn_blocked() {
  ((CUPYDCN_OK)) || echo "cupydcn does not import (see install)"
}

stage_probe() {
  stage_begin probe 30 5 || return
  local log="$LOGS/probe.log" san
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "cpus: $(nproc 2>/dev/null || echo '?')"
    echo "commit: $COMMIT (from $COMMIT_SOURCE)"
    echo "work folder: $WORK"
    free -g 2>/dev/null | head -n 2
  } >>"$log" 2>&1
  if command -v nvidia-smi >/dev/null 2>&1; then
    run_logged probe nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    run_logged probe nvidia-smi
  else
    echo "nvidia-smi: not found" >>"$log"
  fi
  if command -v nvcc >/dev/null 2>&1; then
    run_logged probe nvcc --version
  else
    echo "nvcc: not found" >>"$log"
  fi
  if san=$(find_sanitizer); then
    run_logged probe "$san" --version
  else
    echo "compute-sanitizer: not found" >>"$log"
  fi
  local rc=0
  run_logged probe "$PYTHON" "$TOOLS" probe || rc=$?
  local detail
  detail=$(result_of "$log")
  if ((rc == 0)); then
    stage_end probe ok "$detail"
  else
    stage_end probe failed "the Python probe exited $rc${detail:+; $detail}"
  fi
}

stage_install() {
  stage_begin install 30 5 || return
  local log="$LOGS/install.log" wanted=() rc=0 detail installed=""
  if [ -d "$WHEELS" ]; then
    mapfile -t wanted < <(timeout -k 5 "$(stage_left)" "$PYTHON" "$TOOLS" missing-wheels "$WHEELS" 2>>"$log")
  else
    echo "no wheel folder $WHEELS" >>"$log"
  fi
  if ((${#wanted[@]})); then
    mkdir -p "$SITE"
    run_logged install "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "${wanted[@]}" || rc=$?
    installed=$(for w in "${wanted[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    echo "PYTHONPATH=$PYTHONPATH" >>"$log"
  fi
  local vrc=0
  run_logged install "$PYTHON" "$TOOLS" verify-imports || vrc=$?
  detail=$(result_of "$log")
  ((vrc == 0)) || CUPYDCN_OK=0
  if ((rc != 0)); then
    stage_end install failed "pip exited $rc installing ${installed}; $detail"
  elif ((vrc != 0)); then
    stage_end install failed "${installed:+installed ${installed}; }$detail"
  elif [ -n "$installed" ]; then
    stage_end install ok "installed ${installed}from $(basename "$WHEELS")/; $detail"
  elif [ -d "$WHEELS" ]; then
    stage_end install ok "nothing missing ($(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l | tr -d ' ') wheel(s) in $WHEELS, none needed); $detail"
  else
    stage_end install ok "nothing missing (no wheel folder $WHEELS); $detail"
  fi
}

stage_check() {
  stage_begin check 90 10 "$(cupydcn_blocked)" || return
  local log="$LOGS/check.log" rc=0 verdict backends
  run_logged check "$PYTHON" -m cupydcn check || rc=$?
  verdict=$(grep -aE '^(all checks passed|[0-9]+ check\(s\) FAILED)' "$log" | tail -n 1)
  backends=$(grep -a '^backends: ' "$log" | tail -n 1)
  if ((rc == 0)); then
    stage_end check ok "${verdict:-exit 0}; $backends"
  elif ((rc == 124)); then
    stage_end check failed "timed out after ${STAGE_TIMEOUT} s; $backends"
  else
    stage_end check failed "${verdict:-exit $rc}; $backends"
  fi
}

pytest_verdict() { # rc junit_xml log
  local rc=$1 counts
  counts=$("$PYTHON" "$TOOLS" junit "$2" 2>/dev/null | grep '^RESULT: ' | sed 's/^RESULT: //')
  case $rc in
    0) echo "ok|${counts}" ;;
    1) echo "failed|${counts}" ;;
    5) echo "failed|no tests collected" ;;
    124) echo "failed|timed out after ${STAGE_TIMEOUT} s${counts:+ (${counts})}" ;;
    *) echo "failed|pytest exited $rc${counts:+ (${counts})}; see $(basename "$3")" ;;
  esac
}

stage_gpu_tests() {
  local blocked
  blocked=$(gpu_blocked gpu_tests)
  [ -z "$blocked" ] && blocked=$(cupydcn_blocked)
  stage_begin gpu_tests 120 30 "$blocked" || return
  local rc=0 verdict
  run_logged gpu_tests "$PYTHON" -m pytest -m gpu "${PYTEST_ARGS[@]}" -q -rfE \
    --continue-on-collection-errors -o cache_dir="$WORK/pytest_cache" \
    --junitxml="$WORK/gpu_tests.xml" || rc=$?
  GPU_STRICT_RC=$rc
  verdict=$(pytest_verdict "$rc" "$WORK/gpu_tests.xml" "$LOGS/gpu_tests.log")
  stage_end gpu_tests "${verdict%%|*}" "strict (warnings are errors): ${verdict#*|}"
}

stage_gpu_tests_rerun() {
  local blocked=""
  case $GPU_STRICT_RC in
    "") blocked="the strict run was skipped" ;;
    0) blocked="no failures in the strict run" ;;
    124) blocked="the strict run timed out: no list of its failures" ;;
    1) ;;
    *) blocked="the strict run exited $GPU_STRICT_RC: no list of failures to rerun" ;;
  esac
  stage_begin gpu_tests_rerun 60 10 "$blocked" || return
  local log="$LOGS/gpu_tests_rerun.log" rc=0 detail modules=() rerun_xml=("$WORK/gpu_tests_rerun.xml")
  # Modules that failed to collect (a warning at import time, say) are rerun whole: --lf
  # would run only part of them.
  mapfile -t modules < <("$PYTHON" "$TOOLS" lastfailed-modules "$WORK/pytest_cache" \
    "${PYTEST_ARGS[@]}" 2>>"$log")
  run_logged gpu_tests_rerun "$PYTHON" -m pytest -m gpu "${PYTEST_ARGS[@]}" -q -rfE \
    --lf --lfnf=none -W default --continue-on-collection-errors \
    -o cache_dir="$WORK/pytest_cache" --junitxml="$WORK/gpu_tests_rerun.xml" || rc=$?
  if ((${#modules[@]})) && ((rc != 124)); then
    local mrc=0
    local options=() arg take=0
    for arg in "${PYTEST_ARGS[@]}"; do # the run's options (-c, --rootdir), not its paths
      if ((take)); then
        options+=("$arg")
        take=0
      elif [[ $arg == -* ]]; then
        options+=("$arg")
        case $arg in
          -c | -k | -m | -p | -o | -W | --rootdir | --config-file | --confcutdir | --deselect | --ignore) take=1 ;;
        esac
      fi
    done
    run_logged gpu_tests_rerun "$PYTHON" -m pytest -m gpu "${options[@]}" "${modules[@]}" -q -rfE -W default \
      --continue-on-collection-errors -p no:cacheprovider \
      --junitxml="$WORK/gpu_tests_rerun_modules.xml" || mrc=$?
    ((mrc == 124)) && rc=124
    rerun_xml+=("$WORK/gpu_tests_rerun_modules.xml")
  fi
  local crc=0
  "$PYTHON" "$TOOLS" rerun "$WORK/gpu_tests.xml" "${rerun_xml[@]}" >>"$log" 2>&1 || crc=$?
  detail=$(result_of "$log")
  if ((rc == 124)); then
    stage_end gpu_tests_rerun failed "timed out after ${STAGE_TIMEOUT} s; $detail"
  elif ((crc == 0)); then
    stage_end gpu_tests_rerun ok "$detail"
  else
    stage_end gpu_tests_rerun failed "$detail"
  fi
}

stage_memcheck() {
  local blocked san=""
  blocked=$(gpu_blocked memcheck)
  if [ -z "$blocked" ] && ! san=$(find_sanitizer); then
    blocked="compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  fi
  [ -z "$blocked" ] && blocked=$(cupydcn_blocked)
  stage_begin memcheck 90 20 "$blocked" || return
  local log="$LOGS/memcheck.log" rc=0 errors verdict
  run_logged memcheck "$san" --tool memcheck --error-exitcode 97 --print-limit 100 \
    "$PYTHON" "$TOOLS" run-module --no-cupy-pool cupydcn check || rc=$?
  errors=$(grep -aoE 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -n 1 | grep -oE '[0-9]+')
  verdict=$(grep -aE '^(all checks passed|[0-9]+ check\(s\) FAILED)' "$log" | tail -n 1)
  if ((rc == 0)); then
    stage_end memcheck ok "${errors:-0} memcheck errors; check: ${verdict:-?}"
  elif ((rc == 124)); then
    stage_end memcheck failed "timed out after ${STAGE_TIMEOUT} s (check under memcheck)"
  elif ((rc == 97)) || [ "${errors:-0}" != 0 ]; then
    stage_end memcheck failed "${errors:-some} memcheck error(s); check: ${verdict:-?}"
  else
    local why
    why=$(grep -aiE 'not supported|error' "$log" | grep -v 'ERROR SUMMARY' | head -n 1 | cut -c1-160)
    stage_end memcheck failed "exit $rc; check: ${verdict:-did not finish}${why:+; $why}"
  fi
}

stage_large_index() {
  stage_begin large_index 120 30 "$(cupydcn_blocked)" || return
  local log="$LOGS/large_index.log" rc=0 detail
  run_logged large_index "$PYTHON" "$LARGE" --budget-s "$(($(stage_left) > 15 ? $(stage_left) - 10 : 5))" \
    --json "$WORK/large_index.json" || rc=$?
  detail=$(result_of "$log")
  detail=${detail#ok: }
  detail=${detail#failed: }
  detail=${detail#skipped: }
  case $rc in
    0) stage_end large_index ok "$detail" ;;
    3) stage_end large_index skipped "$detail" ;;
    124) stage_end large_index failed "timed out after ${STAGE_TIMEOUT} s" ;;
    *) stage_end large_index failed "${detail:-exit $rc}" ;;
  esac
}

stage_bench() {
  local blocked
  blocked=$(gpu_blocked bench)
  [ -n "$blocked" ] && blocked="$blocked (without a GPU the suite times the NumPy backend: run it by hand)"
  [ -z "$blocked" ] && blocked=$(cupydcn_blocked)
  stage_begin bench 150 30 "$blocked" 25 || return
  local parts=() part i=0 rc left notes=() failed=0 json
  IFS=';' read -r -a parts <<<"$BENCH_PARTS"
  for part in "${parts[@]}"; do
    i=$((i + 1))
    left=$(stage_left)
    if ((left < 20)); then
      notes+=("'$part' not run (${left} s left)")
      failed=1
      continue
    fi
    json="$WORK/bench_$i.json"
    rc=0
    run_logged bench "$PYTHON" -m pytest benchmarks/ -q -p no:cacheprovider -k "$part" \
      --benchmark-json="$json" --bench-rounds "$BENCH_ROUNDS" --bench-warmup "$BENCH_WARMUP" \
      "${BENCH_ARGS[@]}" || rc=$?
    [ -s "$json" ] && BENCH_JSONS+=("$json")
    case $rc in
      0) notes+=("'$part' ok") ;;
      124) notes+=("'$part' timed out after ${left} s"); failed=1 ;;
      *) notes+=("'$part' exit $rc"); failed=1 ;;
    esac
  done
  local detail
  detail="${#BENCH_JSONS[@]} of ${#parts[@]} part(s) with JSON, ${BENCH_ROUNDS} rounds, ${BENCH_WARMUP} warm-up: $(IFS=,; echo "${notes[*]}")"
  if ((failed)); then
    stage_end bench failed "$detail"
  else
    stage_end bench ok "$detail"
  fi
}

stage_report() {
  local blocked="" earlier=() i=0 file
  IFS=';' read -r -a earlier <<<"${GPU_SESSION_BENCH_JSON:-}"
  for file in "${earlier[@]}"; do
    i=$((i + 1))
    if [ -s "$file" ]; then
      cp "$file" "$WORK/earlier_$i.json" && BENCH_JSONS+=("$WORK/earlier_$i.json")
    else
      say "GPU_SESSION_BENCH_JSON: no file $file"
    fi
  done
  if ((${#BENCH_JSONS[@]} == 0)); then
    blocked="no benchmark JSON (bench: ${ST_STATUS[bench]:-not run})"
  fi
  stage_begin report 30 5 "$blocked" || return
  local log="$LOGS/report.log" rc=0 line
  run_logged report "$PYTHON" "$TOOLS" stamp --commit "$COMMIT" --source "$COMMIT_SOURCE" \
    "${BENCH_JSONS[@]}" || rc=$?
  if ((rc == 0)); then
    run_logged report "$PYTHON" benchmarks/report.py "${BENCH_JSONS[@]}" --save-results \
      --results-dir "$RESULTS_DIR" "${REPORT_ARGS[@]}" || rc=$?
  fi
  if ((rc != 0)); then
    stage_end report failed "exit $rc"
    return
  fi
  mkdir -p "$OUTDIR/results"
  while IFS= read -r line; do
    if [ -f "$line" ]; then
      cp "$line" "$OUTDIR/results/" && RESULT_FILES+=("$(basename "$line")")
    fi
  done < <(grep -aE '\.(json|md|png)$' "$log" | grep -av '^\$ ')
  if ((${#RESULT_FILES[@]} == 0)); then
    stage_end report failed "report.py wrote no results"
  else
    stage_end report ok "$(IFS=' '; echo "${RESULT_FILES[*]}") in $RESULTS_DIR and results/"
  fi
}

# ---------------------------------------------------------------------------- the end
# shellcheck disable=SC2329  # run by the EXIT trap (finish)
write_summary() {
  local md="$OUTDIR/summary.md" name status took
  {
    echo "# cupydcn GPU session"
    echo
    echo "- commit: $COMMIT (from $COMMIT_SOURCE)"
    echo "- device: ${GPU_NAME:-none: $NO_GPU_REASON}"
    echo "- finished $(date -u +%Y-%m-%dT%H:%M:%SZ) after ${SECONDS} s of the ${DEADLINE} s deadline"
    if ((KEEP_WORK)); then
      echo "- work folder (kept): $WORK"
    fi
    echo
    echo "| stage | status | seconds | budget | detail |"
    echo "|---|---|---|---|---|"
    for name in "${STAGES[@]}"; do
      status=${ST_STATUS[$name]:-skipped}
      took=${ST_TIME[$name]:-0}
      echo "| $name | $status | $took | ${ST_BUDGET[$name]:--} | ${ST_DETAIL[$name]:-not reached} |"
    done
    echo
    if [ -s "$LOGS/probe.log" ]; then
      echo "## Environment"
      echo
      echo '```'
      grep -avE '^(\$ |###)' "$LOGS/probe.log" | head -n 60
      echo '```'
      echo
    fi
    if [ -s "$LOGS/large_index.log" ]; then
      echo "## Past 2^31 elements (large_index)"
      echo
      echo '```'
      grep -av '^\$ ' "$LOGS/large_index.log" | tail -n 80
      echo '```'
      echo
    fi
    if [ -s "$LOGS/gpu_tests_rerun.log" ]; then
      echo "## Strict failures told apart"
      echo
      echo '```'
      grep -aE '^(WARNINGS ONLY|REAL FAILURE|NOT RERUN|RESULT)' "$LOGS/gpu_tests_rerun.log" | head -n 80
      echo '```'
      echo
    fi
    for name in "${STAGES[@]}"; do
      if [ "${ST_STATUS[$name]:-}" = failed ] && [ -s "$LOGS/$name.log" ]; then
        echo "## $name: last lines of its log"
        echo
        echo '```'
        tail -n 40 "$LOGS/$name.log"
        echo '```'
        echo
      fi
    done
  } >"$md"
}

# shellcheck disable=SC2329  # run by the EXIT trap (finish)
print_table() {
  local name status
  say ""
  say "== cupydcn GPU session: commit $COMMIT, device ${GPU_NAME:-none}, ${SECONDS} s of ${DEADLINE} s =="
  say "$(printf '%-16s %-8s %5s  %s' stage status secs detail)"
  for name in "${STAGES[@]}"; do
    status=${ST_STATUS[$name]:-skipped}
    say "$(printf '%-16s %-8s %5s  %s' "$name" "$status" "${ST_TIME[$name]:-0}" "${ST_DETAIL[$name]:-not reached}")"
  done
  say "output: $OUTDIR (summary.md, session.log, logs.tar.gz${RESULT_FILES[0]:+, results/})"
}

FINISHED=0
# shellcheck disable=SC2329  # run by the EXIT trap (finish)
finish() {
  ((FINISHED)) && return
  FINISHED=1
  local name
  for name in "${STAGES[@]}"; do
    if [ -z "${ST_STATUS[$name]:-}" ]; then
      ST_STATUS[$name]=skipped
      ST_DETAIL[$name]="not reached (the script was interrupted)"
    fi
  done
  write_summary
  {
    for name in "${STAGES[@]}"; do
      if [ -s "$LOGS/$name.log" ]; then
        echo
        echo "######## $name.log"
        if (($(wc -l <"$LOGS/$name.log") > 3000)); then
          head -n 1000 "$LOGS/$name.log"
          echo "[... $(($(wc -l <"$LOGS/$name.log") - 2500)) lines left out: the whole log is in logs.tar.gz ...]"
          tail -n 1500 "$LOGS/$name.log"
        else
          cat "$LOGS/$name.log"
        fi
      fi
    done
  } >>"$SESSION_LOG"
  (
    cd "$WORK" || exit
    shopt -s nullglob
    extra=(./*.xml ./*.json)
    tar -czf "$OUTDIR/logs.tar.gz" logs "${extra[@]}"
  ) 2>/dev/null
  print_table
  if ((KEEP_WORK)); then
    say "work folder kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap finish EXIT
trap 'say "interrupted"; exit 130' INT TERM

resolve_commit
say "cupydcn GPU session: $ROOT, commit $COMMIT (from $COMMIT_SOURCE), deadline ${DEADLINE} s, output $OUTDIR"
stage_probe
stage_install
detect_gpu
if ((HAVE_GPU)); then
  say "GPU: $GPU_NAME"
else
  say "no GPU: $NO_GPU_REASON"
fi
stage_check
stage_gpu_tests
stage_gpu_tests_rerun
stage_memcheck
stage_large_index
stage_bench
stage_report
exit 0
