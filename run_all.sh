#!/usr/bin/env bash
# Reproduce every result: the CIFAR-100 baseline and ablation ladder, the final CIFAR model, the birds
# transfer study (frozen feature extractor, frozen up to each depth, LP-FT, BatchNorm policy, learning rates,
# layer decay, dropout + label smoothing), the final prediction CSVs, and results/REPORT.md.
#
#   bash run_all.sh                      # everything, on real data (CIFAR_DATA, BIRDS_DATA below)
#   bash run_all.sh --smoke              # the whole chain in minutes on CPU with small generated data
#   bash run_all.sh --only cifar         # or --only birds
#   bash run_all.sh --epochs-scale 0.5   # every run with half its epochs
#   bash run_all.sh --seeds 3            # each run with seeds 0,1,2; the report gives mean ± std
#   bash run_all.sh --plan-only          # fetch the inputs, print the plan and its time estimate, run nothing
#   bash run_all.sh --jobs 4             # 4 runs at once: one GPU each (round-robin), or the CPU cores shared
#   bash run_all.sh --print-commands     # each pending run as one shell line, for sbatch --array or parallel
#   bash run_all.sh --report-only        # the CSVs, REPORT and notebook from the runs finished so far
#
# First it fetches whatever is missing (CIFAR-100, CUB-200-2011, ImageNet weights) or, offline, says in one
# sentence per piece what to fetch and exits 1 before any run; then it prints the plan with a time estimate.
# A run whose final.json exists is skipped; an unfinished one resumes from its last.pt. Each run writes its
# output to RUN/log.txt; the console gets one line per start and finish. A failed run does not stop the others:
# at the end they are listed with their logs' last lines, the report is written from what finished, and the
# exit status is 1 (running again retries only those). Settings from the environment: PYTHON, RESULTS (results),
# CIFAR_DATA (data), BIRDS_DATA (data/CUB_200_2011), BIRDS_ARCH (resnet50), BIRDS_WEIGHTS (imagenet),
# BIRDS_IMG (224), DEVICE (auto), EXTRA (more flags for every run), CIFAR_FINAL (1; 0 leaves out the final
# WRN-28-10 run, e.g. for the ladder alone on a CPU), BIRDS_LP_EPOCHS (10), THREADS (CPU threads per run;
# default the cores divided by --jobs), NOTEBOOK (1; 0 writes the report without executing lab2.ipynb). A GPU that
# torch cannot use (a driver older than its CUDA build) stops it first, with the fix; DEVICE=cpu runs on the CPU.
#
# Several runs at once: --jobs N runs N at a time, one GPU each (CUDA_VISIBLE_DEVICES, round-robin; default: the
# visible GPUs' count), or sharing the CPU cores (each slot pinned to its share with taskset, cores / N threads each).
# Results do not depend on --jobs (each run's seeds, order and augmentation are its own). On a cluster, hand the runs
# to its scheduler, then write the report from what finished:
#   bash run_all.sh --print-commands > runs.txt
#   sbatch --array=1-$(wc -l < runs.txt)%8 --gres=gpu:1 --cpus-per-task=8 --wrap 'bash -c "$(sed -n ${SLURM_ARRAY_TASK_ID}p runs.txt)"'
#   parallel -j 4 'CUDA_VISIBLE_DEVICES=$(({%} - 1)) bash -c {}' :::: runs.txt     # or GNU parallel, 4 GPUs
#   bash run_all.sh --report-only
# Every run writes TensorBoard event files into its folder: `tensorboard --logdir results` shows the sweep, live.
set -euo pipefail
cd "$(dirname "$0")"

SMOKE=0; ONLY=all; SCALE=1; SEEDS=1; PLAN_ONLY=0; JOBS=""; PRINT=0; REPORT_ONLY=0; INVOCATION="bash run_all.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) ONLY="$2"; shift ;;
    --epochs-scale) SCALE="$2"; shift ;;
    --seeds) SEEDS="$2"; shift ;;
    --plan-only) PLAN_ONLY=1 ;;
    --jobs) JOBS="$2"; shift ;;
    --print-commands) PRINT=1 ;;
    --report-only) REPORT_ONLY=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$ONLY" in all|cifar|birds) ;; *) echo "run_all.sh: --only takes cifar or birds" >&2; exit 2 ;; esac
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: --seeds takes a positive integer" >&2; exit 2; }
[[ -z "$JOBS" || "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: --jobs takes a positive integer" >&2; exit 2; }
[[ -z "${THREADS:-}" || "${THREADS:-}" =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: THREADS must be a positive integer" >&2; exit 2; }

PYTHON=${PYTHON:-python}
# Before anything else: a Python that has the requirements (a shell without the venv active has none of them).
# (find_spec looks the packages up without importing them: milliseconds, where importing them takes seconds)
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'timm', 'pandas')))" >/dev/null 2>&1; then
  echo "run_all.sh: '$PYTHON' cannot import torch (or torchvision, timm, pandas): activate the venv (. .venv/bin/activate)," \
       "or install the requirements (python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt)," \
       "or set PYTHON to a Python that has them" >&2
  exit 1
fi
# Then the machine, where an NVIDIA driver shows: a GPU this torch cannot use (its driver older than torch's CUDA
# build, or a CPU-only torch) is said in one sentence with the install line that fits, and stops everything before
# anything is fetched or planned, unless DEVICE=cpu asks for the CPU on purpose (python devices.py says more).
MACHINE_SAID=0
if [ "$REPORT_ONLY" = 0 ] && [ "$PRINT" = 0 ] && [ "${DEVICE:-}" != cpu ] &&
   { command -v nvidia-smi >/dev/null || [ -e /proc/driver/nvidia/version ]; }; then
  set +e; "$PYTHON" devices.py --short; rc=$?; set -e
  MACHINE_SAID=1
  if [ "$rc" != 0 ]; then
    echo "run_all.sh: stopped before the plan (the mismatch above); DEVICE=cpu bash run_all.sh ... runs everything on" \
         "the CPU on purpose" >&2
    exit 2
  fi
fi
RESULTS=${RESULTS:-results}
CIFAR_DATA=${CIFAR_DATA:-data}
BIRDS_DATA=${BIRDS_DATA:-data/CUB_200_2011}
BIRDS_ARCH=${BIRDS_ARCH:-resnet50}
BIRDS_WEIGHTS=${BIRDS_WEIGHTS:-imagenet}
BIRDS_IMG=${BIRDS_IMG:-224}
EXTRA=${EXTRA:-}
DEVICE_FLAG=""; [ -n "${DEVICE:-}" ] && DEVICE_FLAG="--device $DEVICE"
WIDTH=32; WIDE=64; CIFAR_FINAL_FLAGS=""
CIFAR_SMOKE=""; BIRDS_SMOKE=""

if [ "$SMOKE" = 1 ]; then
  SCALE=$($PYTHON -c "print(0.07 * $SCALE)")   # 30 epochs become 2
  SMOKE_DATA="$RESULTS/smoke_data"
  [ -d "$SMOKE_DATA/cifar/cifar-100-python" ] || $PYTHON tests/fixtures.py cifar "$SMOKE_DATA/cifar" --per-class 20 >/dev/null
  [ -d "$SMOKE_DATA/cub/CUB_200_2011" ] || $PYTHON tests/fixtures.py cub "$SMOKE_DATA/cub" --classes 5 --per-class 12 >/dev/null
  CIFAR_DATA="$SMOKE_DATA/cifar"; BIRDS_DATA="$SMOKE_DATA/cub/CUB_200_2011"
  BIRDS_ARCH=test_resnet; BIRDS_WEIGHTS=none; BIRDS_IMG=64; WIDTH=8; WIDE=16   # timm's tiny 4-stage test ResNet
  CIFAR_FINAL_FLAGS="--depth 10 --widen 1 --batch-size 64 --epochs 3 --time-budget 0"   # a WRN-10-1 stands in for
  # WRN-28-10, for 3 epochs, not for a budget (the smoke chain's runs must not depend on the machine's speed)
  EXTRA="$EXTRA --quiet"
  CIFAR_SMOKE="--val-per-class 5"; BIRDS_SMOKE="--batch-size 8 --workers 0"
fi

# 1. Inputs, before anything runs: fetch what is missing (CIFAR-100, CUB-200-2011, ImageNet weights into the
# torchvision/timm cache); offline, one sentence per missing piece and exit 1, with results/ untouched.
if [ "$SMOKE" = 0 ]; then
  NEED=()
  [ "$ONLY" != birds ] && NEED+=(--cifar-dir "$CIFAR_DATA")
  [ "$ONLY" != cifar ] && NEED+=(--birds-dir "$BIRDS_DATA" --arch "$BIRDS_ARCH" --weights "$BIRDS_WEIGHTS")
  $PYTHON data.py prepare "${NEED[@]}" || { echo "run_all.sh: nothing was run; fetch the above, then run again" >&2; exit 1; }
fi

epochs() { $PYTHON -c "print(max(1, round($1 * $SCALE)))"; }

# run STUDY NAME "CHANGE" SCRIPT FLAGS...: one plan row, and one job per seed: a self-contained shell line (cd,
# environment, flags, --out, --resume, output to RUN/log.txt) that run_all.sh runs itself, or prints for a scheduler.
PY=$(command -v "$PYTHON" || echo "$PYTHON")
run() {
  local study=$1 name=$2 change=$3; shift 3
  printf '%s\t%s\t%s\t%s\t%s\n' "$study" "$name" "$change" "$SEEDS" "$*" >> "$PLAN_TMP"
  local seed out
  for ((seed = 0; seed < SEEDS; seed++)); do
    out="$RESULTS/$study/$name/seed$seed"
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\n' "$study/$name/seed$seed" "$out" "cd $(printf %q "$PWD") && mkdir -p $(printf %q "$out") && \
${LINE_ENV}$(printf '%q ' "$PY" "$@" --seed "$seed" --out "$out" --resume $DEVICE_FLAG)>> $(printf %q "$out/log.txt") 2>&1" \
      >> "$JOBS_TMP"
  done
}

CIFAR_EXTRA="$EXTRA $CIFAR_SMOKE"
# Birds: the linear probe's epochs (cheap: cached features, so not scaled), and which --freeze-stages depths to
# run: every depth below the backbone's stage count for up to 4 stages (a ResNet: 3 2 1), else three spread out.
LPE=${BIRDS_LP_EPOCHS:-10}
[ "$SMOKE" = 1 ] && LPE=2
FREEZE_DEPTHS=""
if [ "$SMOKE" = 1 ]; then
  FREEZE_DEPTHS=2   # one depth keeps the smoke chain short
elif [ "$ONLY" != cifar ]; then
  FREEZE_DEPTHS=$($PYTHON -c "import models; n = len(models.backbone_stages(models.make_backbone('$BIRDS_ARCH')[0])) - 1
print(*sorted({round(i * (n - 1) / 3) for i in (3, 2, 1)} - {0} if n > 4 else range(n - 1, 0, -1), reverse=True))")
fi
BIRDS_EXTRA="$EXTRA $BIRDS_SMOKE"

studies() {
if [ "$ONLY" != birds ]; then
  E=$(epochs 30)
  C="train_cifar.py --data-dir $CIFAR_DATA --epochs $E $CIFAR_EXTRA"
  AUG="--normalize --aug flip,crop"
  SGD="--optimizer sgd --nesterov --lr 0.05 --wd 5e-4 --batch-size 128"
  SCHED="--lr 0.1 --schedule onecycle --label-smoothing 0.1 --dropout 0.2"
  run cifar 01_basenet "BaseNet, course recipe" $C
  run cifar 02_normalize "+ per-channel normalisation" $C --normalize
  run cifar 03_augment "+ random crop and flip" $C $AUG
  run cifar 04_depth "+ 8 conv layers, PyTorch's default init, no normalisation" $C $AUG --depth 8 --width $WIDTH --init default
  run cifar 05_kaiming "+ He (Kaiming) initialisation" $C $AUG --depth 8 --width $WIDTH --init kaiming
  run cifar 06_bn "+ BatchNorm, SGD lr 0.05 Nesterov, weight decay (He init kept)" $C $AUG --depth 8 --width $WIDTH --bn $SGD \
      --init kaiming
  # from here on the per-family default init: PyTorch's default once BatchNorm follows every conv
  run cifar 07_bn_init "+ PyTorch's default init instead of He (BatchNorm makes each conv scale-invariant)" $C $AUG \
      --depth 8 --width $WIDTH --bn $SGD
  run cifar 08_schedule "+ one-cycle schedule, label smoothing, dropout" $C $AUG --depth 8 --width $WIDTH --bn $SGD $SCHED
  run cifar 09_ema "+ EMA of the weights (0.99, decay warmed up)" $C $AUG --depth 8 --width $WIDTH --bn $SGD $SCHED --ema 0.99
  run cifar 10_cutmix "+ CutMix (alpha 1, half the samples)" $C $AUG --depth 8 --width $WIDTH --bn $SGD $SCHED --ema 0.99 \
      --cutmix 1.0 --mix-prob 0.5
  run cifar 11_width "+ twice the width" $C $AUG --depth 8 --width $WIDE --bn $SGD $SCHED --ema 0.99 --cutmix 1.0 --mix-prob 0.5
  if [ "${CIFAR_FINAL:-1}" = 1 ]; then
    run cifar 12_final "final preset: WRN-28-10, CutMix, EMA, flip+shift TTA (final model)" train_cifar.py \
        --data-dir "$CIFAR_DATA" --preset final --time-budget "$(epochs 600)" $CIFAR_EXTRA $CIFAR_FINAL_FLAGS
  fi
fi

if [ "$ONLY" != cifar ]; then
  # Every fine-tuning row is the default recipe (LP-FT: a linear probe on cached features, then the whole network
  # with BatchNorm statistics frozen, SGD lr 1e-3) with one thing changed.
  E=$(epochs 15)
  B="finetune_birds.py --data-dir $BIRDS_DATA --arch $BIRDS_ARCH --weights $BIRDS_WEIGHTS --img-size $BIRDS_IMG $BIRDS_EXTRA"
  FT0="$B --epochs $E"               # fine-tuning without its probe's epochs, for the rows that set --lp-epochs 0
  FT="$FT0 --lp-epochs $LPE"
  # the design card's command: --freeze-backbone alone is the linear probe (cached features, AdamW 1e-3)
  run birds frozen "frozen backbone: linear probe on cached features" $B --freeze-backbone --epochs "$LPE"
  for K in $FREEZE_DEPTHS; do
    run birds "stages$K" "LP-FT, stem + $K stages frozen" $FT --freeze-stages "$K"
  done
  run birds lpft "LP-FT, whole network (default recipe)" $FT
  run birds no_lp "fine-tune from a random head (no linear probe)" $FT0 --lp-epochs 0
  run birds bn_train "LP-FT, BatchNorm in train mode" $FT --bn-mode train
  run birds lr3e-3 "LP-FT, lr 3e-3" $FT --lr 3e-3
  run birds lr1e-2 "LP-FT, lr 1e-2" $FT --lr 1e-2
  run birds layer_decay "LP-FT, layer-wise lr decay 0.7" $FT --layer-decay 0.7
  run birds dropout_ls "LP-FT, dropout 0.3 + label smoothing 0.1" $FT --dropout 0.3 --label-smoothing 0.1
  run birds old_default "the previous default: random head, BatchNorm train, lr 0.01, backbone x0.1" $FT0 \
      --lp-epochs 0 --bn-mode train --lr 0.01 --backbone-lr-mult 0.1
fi
}

# 2. The plan: every run (plan.tsv: one row per run) and every job (one line per run and seed).
PLAN_TMP=$(mktemp); JOBS_TMP=$(mktemp); TIMES_TMP=$(mktemp); STATUS=$(mktemp)
trap 'rm -f "$PLAN_TMP" "$JOBS_TMP" "$TIMES_TMP" "$STATUS"' EXIT
printf 'study\trun\tchange\tseeds\tcommand\n' > "$PLAN_TMP"
LINE_ENV=""; [ -n "${THREADS:-}" ] && LINE_ENV="OMP_NUM_THREADS=$THREADS "   # printed lines carry only what you set
studies

write_plan() {
  mkdir -p "$RESULTS"
  cut -f1-4 "$PLAN_TMP" > "$RESULTS/plan.tsv"
  { echo "$INVOCATION"; for v in CIFAR_DATA BIRDS_DATA BIRDS_ARCH BIRDS_WEIGHTS BIRDS_IMG DEVICE EXTRA THREADS; do
      if [ -n "${!v:-}" ]; then printf '%s=%q\n' "$v" "${!v}"; fi; done; } > "$RESULTS/invocation.txt"
}

# Jobs still to run: those without a final.json.
KEYS=(); OUTS=(); LINES=(); ESTS=()
while IFS=$'\t' read -r key out line; do
  if [ -f "$out/final.json" ]; then
    [ "$PRINT" = 1 ] || echo "== $key: done, skipped"
    continue
  fi
  KEYS+=("$key"); OUTS+=("$out"); LINES+=("$line")
done < "$JOBS_TMP"

# --print-commands: the pending lines and nothing else on stdout (run them in any order, anywhere that sees this
# folder; then `bash run_all.sh --report-only` with the same flags writes the CSVs and the report).
if [ "$PRINT" = 1 ]; then
  write_plan
  [ ${#LINES[@]} -eq 0 ] || printf '%s\n' "${LINES[@]}"
  exit 0
fi

# 3. Devices: with CUDA one run per GPU at a time (CUDA_VISIBLE_DEVICES, round-robin over the visible GPUs when
# --jobs exceeds them); on a CPU the runs share the cores, THREADS (default cores / jobs) each. DEVICE=cuda:K or
# DEVICE=cpu puts every run there.
GPUS=()
# torch is asked only where a GPU driver shows (NVIDIA, ROCm, WSL2): importing it costs seconds on every invocation.
if [ "$REPORT_ONLY" = 0 ] && [[ -z "${DEVICE:-}" || "${DEVICE:-}" == cuda ]] &&
   { [ -e /proc/driver/nvidia ] || [ -e /dev/nvidiactl ] || [ -e /dev/kfd ] || [ -e /dev/dxg ]; }; then
  mapfile -t GPUS < <($PYTHON -c "import os, torch
n = torch.cuda.device_count()
for i in [s for s in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if s][:n] or range(n): print(i)")
fi
NGPU=${#GPUS[@]}
JOBS=${JOBS:-$((NGPU > 0 ? NGPU : 1))}
CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
THREADS_PER_RUN=${THREADS:-$((CORES / JOBS > 0 ? CORES / JOBS : 1))}
SLOW=$(( (JOBS + (NGPU > 0 ? NGPU : 1) - 1) / (NGPU > 0 ? NGPU : 1) ))   # runs sharing one GPU, or the CPU
# With several runs at once, each slot gets its own THREADS_PER_RUN cores (taskset, where present): a run's image
# loader workers, DALI threads and torch threads default to the cores it may use (data.default_workers), so the runs
# split the machine instead of each starting one worker per core.
mapfile -t CPU_IDS < <($PYTHON -c "import os; print(*sorted(os.sched_getaffinity(0)), sep='\n')")
CAN_PIN=0   # taskset installed and allowed to set an affinity here (a container may forbid it)
command -v taskset >/dev/null && taskset -c "${CPU_IDS[0]}" true 2>/dev/null && CAN_PIN=1
slot_cpus() {
  local k ids=()
  for ((k = 0; k < THREADS_PER_RUN; k++)); do ids+=("${CPU_IDS[$(( ($1 * THREADS_PER_RUN + k) % ${#CPU_IDS[@]} ))]}"); done
  (IFS=,; echo "${ids[*]}")
}

if [ "$REPORT_ONLY" = 0 ]; then
  # The plan with a time estimate from a short measured step per network (tools/plan_estimate.py), for --jobs runs at
  # once: the longest chain of the schedule, not the sum. --plan-only stops here.
  # Nothing pending (every run finished): no estimate to make, straight to the CSVs and the report.
  if [ ${#KEYS[@]} -gt 0 ] || [ "$PLAN_ONLY" = 1 ]; then
    # shellcheck disable=SC2086
    MACHINE_FLAG=""; [ "$MACHINE_SAID" = 0 ] && MACHINE_FLAG="--machine"   # devices.py's three lines, once
    # shellcheck disable=SC2086
    $PYTHON tools/plan_estimate.py "$PLAN_TMP" $DEVICE_FLAG $MACHINE_FLAG --jobs "$JOBS" --gpus "$NGPU" --times "$TIMES_TMP"
  else
    echo "nothing to run: every run of the plan is finished"
    : > "$TIMES_TMP"
  fi
  [ "$PLAN_ONLY" = 1 ] && exit 0
  write_plan
  for key in "${KEYS[@]}"; do   # each pending job's estimate: its plan row's seconds per seed
    awk -F'\t' -v k="${key%/seed*}" '$1 == k {print $2}' "$TIMES_TMP"
  done > "$TIMES_TMP.jobs"
  mapfile -t ESTS < "$TIMES_TMP.jobs"; rm -f "$TIMES_TMP.jobs"
  if [ "$NGPU" -gt 0 ]; then
    echo "running ${#KEYS[@]} runs, $JOBS at a time, on GPUs ${GPUS[*]} (CUDA_VISIBLE_DEVICES, round-robin)"
  elif [[ "${DEVICE:-}" == cuda:* ]]; then
    echo "running ${#KEYS[@]} runs, $JOBS at a time, all on $DEVICE"
  else
    echo "running ${#KEYS[@]} runs, $JOBS at a time, on the CPU: $CORES cores shared, $THREADS_PER_RUN thread(s) per run"
  fi
fi

# 4. The runs: at most JOBS at once (bash job control), each in its own slot; every finish appends to STATUS.
T0=$(date +%s)
clock() { local s=$1; printf '%dh%02dm%02ds' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }
progress() {  # "k of M runs done, elapsed, time left": the plan's estimate for the runs not finished, over JOBS
  local done left
  done=$(wc -l < "$STATUS")
  left=$(awk -F'\t' -v jobs="$JOBS" -v slow="$SLOW" 'FILENAME == ARGV[1] {finished[$2] = 1; next}
                                      !($1 in finished) {s += $2} END {printf "%d", s * slow / jobs}' "$STATUS" <(paste <(printf '%s\n' "${KEYS[@]}") \
                                      <(printf '%s\n' "${ESTS[@]}")))
  echo "$done of ${#KEYS[@]} done, $(clock $(($(date +%s) - T0))) elapsed, about $(clock "$left") left"
}
job() {  # job INDEX SLOT: one run in the background, its output in RUN/log.txt
  local i=$1 slot=$2 key=${KEYS[$1]} start rc where pin=()
  if [ "$NGPU" -gt 0 ]; then
    export CUDA_VISIBLE_DEVICES=${GPUS[$((slot % NGPU))]}; where="GPU $CUDA_VISIBLE_DEVICES"
  else
    export OMP_NUM_THREADS=$THREADS_PER_RUN; where="$THREADS_PER_RUN CPU thread(s)"
    [[ "${DEVICE:-}" == cuda:* ]] && where="$DEVICE"
  fi
  if [ "$JOBS" -gt 1 ] && [ "$CAN_PIN" = 1 ]; then
    pin=(taskset -c "$(slot_cpus "$slot")"); where="$where, CPUs ${pin[2]}"
  fi
  echo "[$(progress)] start $key on $where"
  start=$(date +%s)
  if ${pin[@]+"${pin[@]}"} bash -c "${LINES[$i]}"; then rc=0; else rc=$?; fi
  printf '%s\t%s\t%s\n' "$rc" "$key" "$(($(date +%s) - start))" >> "$STATUS"
  if [ "$rc" = 0 ]; then
    echo "[$(progress)] done  $key in $(clock $(($(date +%s) - start)))"
  else
    echo "[$(progress)] FAILED $key (exit $rc): $(tail -n 1 "${OUTS[$i]}/log.txt" 2>/dev/null)"
  fi
}
STOP=0; trap 'STOP=1' INT TERM   # Ctrl-C reaches the runs too: each saves last.pt; start nothing new
if [ "$REPORT_ONLY" = 0 ]; then
  SLOT_PID=()
  for ((i = 0; i < ${#KEYS[@]}; i++)); do
    while :; do   # the first free slot, else wait for a run to finish
      FREE=""
      for ((s = 0; s < JOBS; s++)); do
        if [ -z "${SLOT_PID[s]:-}" ] || ! kill -0 "${SLOT_PID[s]}" 2>/dev/null; then FREE=$s; break; fi
      done
      [ -n "$FREE" ] || [ "$STOP" = 1 ] && break
      wait -n 2>/dev/null || sleep 0.2
    done
    [ "$STOP" = 1 ] && break
    job "$i" "$FREE" &
    SLOT_PID[FREE]=$!
  done
  while [ -n "$(jobs -pr)" ]; do wait || true; done
  if [ "$STOP" = 1 ]; then
    echo "run_all.sh: interrupted; the runs saved their last.pt: the same command resumes them" >&2
    exit 130
  fi
fi

# 5. Final CSVs from the best checkpoints, each written by predict.py alone; with --seeds > 1 the CIFAR CSV is the
# ensemble of the final recipe's seeds (softmax averaged, with the preset's flip+shift TTA).
FINAL_CKPTS=("$RESULTS"/cifar/12_final/seed*/best.pt)
if [ "$ONLY" != birds ] && [ -f "${FINAL_CKPTS[0]}" ]; then
  # shellcheck disable=SC2086
  $PYTHON predict.py "${FINAL_CKPTS[@]}" --data-dir "$CIFAR_DATA" --out "$RESULTS/cifar_submission.csv" \
      --tta flip,shift $DEVICE_FLAG
fi
if [ "$ONLY" != cifar ]; then
  BEST_BIRDS=$($PYTHON report.py --results "$RESULTS" --best-run birds)
  if [ -n "$BEST_BIRDS" ]; then
    $PYTHON predict.py "$BEST_BIRDS/best.pt" --data-dir "$BIRDS_DATA" --out "$RESULTS/birds_submission.csv" $DEVICE_FLAG
  fi
fi

[ "$REPORT_ONLY" = 1 ] && write_plan
if [ "${NOTEBOOK:-1}" = 0 ]; then
  $PYTHON report.py --results "$RESULTS" --html
  echo "report: $RESULTS/REPORT.md (and REPORT.html); NOTEBOOK=0: the notebook was not run"
else
  $PYTHON report.py --results "$RESULTS" --html --notebook
  echo "report: $RESULTS/REPORT.md (and REPORT.html); notebook run on these results: $RESULTS/lab2.ipynb"
fi

FAILED=$(awk -F'\t' '$1 != 0' "$STATUS")
if [ -n "$FAILED" ]; then
  echo "run_all.sh: $(wc -l <<< "$FAILED") runs failed (the report has what finished; running again retries them):" >&2
  while IFS=$'\t' read -r rc key _; do
    echo "  $key (exit $rc): $(tail -n 1 "$RESULTS/$key/log.txt" 2>/dev/null)" >&2
  done <<< "$FAILED"
  exit 1
fi
