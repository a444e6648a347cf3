#!/usr/bin/env bash
# One prepared training run on a lent GPU machine (the `device` tool), and the fetch of its result.
#
# The machine receives only the working tree (64 MiB; ../shared stays behind) and returns at most
# 8 files, 64 MiB in all, 16 MiB each, per call, so:
#   here:    .venv/bin/python scripts/compact_data.py --data ../shared/data/cxr --output data/cxr256
#            mkdir -p data/cxr_test && cp -r ../shared/data/cxr/test data/cxr_test/ && \
#                awk -F, 'NR==1 || $1=="test"' ../shared/data/cxr/MANIFEST.csv > data/cxr_test/MANIFEST.csv
#            mv models/default.pt /tmp/   # a tracked 116 MiB file would not travel; restore it afterwards
#   device:  bash scripts/gpu_run.sh train          (carry data/cxr256; timeout_s 600). Measures the training step
#                                                    (benchmarks/bench_training.py), trains for MINUTES and
#                                                    returns parts 00-03 of the fp16 checkpoint and the log.
#                                                    PRESET: the recipe (default consistency_mixup, proposed for
#                                                    the next retrain; the shipped 2026.11.27-4: PRESET=robust)
#            bash scripts/gpu_run.sh finish         (carry data/cxr_test; at once, before the machine goes idle)
#                                                    parts 04-07 and the full shortcut audit as audit.tar
#            bash scripts/gpu_run.sh fetch 0|1      (re-sends parts 00-03 or 04-07)
#   here:    cat <files_at>/part_* > runs/gpu/export.pt, check its sha256 against train.log, then
#            export.py --calibrate on ../shared/data/cxr and evaluate.py (see MODEL_CARD.md). Delete
#            data/cxr_test afterwards.
#
# The audit (958 test images x 22 passes) takes ~100 min on the 2-core CPU at 224 px and 1 min on an H200.
# To audit a checkpoint that is here, not on the machine: the fp16 checkpoint (112 MiB) and the test split
# do not fit one call, but files under the ignored runs/ stay on a warm machine between calls:
#   here:    head -c 65000000 CKPT > runs/dev/a/a.bin; tail -c +65000001 CKPT > runs/dev/b/b.bin
#   device:  bash scripts/gpu_run.sh keep           (carry runs/dev/a)
#            bash scripts/gpu_run.sh audit          (carry runs/dev/b and data/cxr_test), at once after
# Preset comparison at one small budget (resnet18, IMAGE_SIZE 96, EPOCHS 8, as in docs/model/decisions.md), with seeds:
#   here:    .venv/bin/python scripts/compact_data.py --data ../shared/data/cxr --output data/cxr160 --max-side 160
#            and data/cxr_test as above
#   device:  bash scripts/gpu_run.sh compare        (carry data/cxr160 and data/cxr_test). STEPS lists kind:seed:preset,
#                                                    e.g. "train:1:robust loso:0:tutorial"; default: seed 0 of each
#                                                    of PRESETS, their LOSO (4 folds), then seeds 1 and 2. A train
#                                                    step is audited on the full test split. Small
#                                                    results go to compare.tar after every step, so a timeout keeps
#                                                    them. 10 of the 12 default steps took 13 min on an H100.
#                                                    HOLDOUTS picks LOSO folds (default: the four CLASS:SOURCE).
# Environment overrides (defaults in brackets) let the same script run a CPU smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RUN=${RUN:-runs/gpu}
OUT=${OUT:?set by the device tool}
export PYTHONUNBUFFERED=1

audit_to_out() {  # audit_to_out CHECKPOINT: the full audit of scripts/audit.py on the carried test split, as one tar
    sha256sum "$1" | tee "$OUT/audit.log"
    "$PY" scripts/audit.py --checkpoint "$1" --data data/cxr_test/test --manifest data/cxr_test/MANIFEST.csv \
        --output-dir "$RUN/audit" --loso-json docs/model/audit/loso.json --device "${DEVICE:-cuda}" \
        --workers "${WORKERS:-15}" --batch-size 64 ${AUDIT_LIMIT:+--limit "$AUDIT_LIMIT"} 2>&1 | tee -a "$OUT/audit.log"
    tar -cf "$OUT/audit.tar" -C "$RUN" audit  # report, json and plots as one file
}

copy_parts() {  # copy_parts FIRST: checkpoint parts FIRST .. FIRST+3 (four 15 MiB files, under a call's 64 MiB)
    for index in 0 1 2 3; do
        part=$(printf "%s/part_%02d" "$RUN" $(( $1 + index )))
        if [ -f "$part" ]; then cp "$part" "$OUT/"; fi
    done
}

case "${1:-}" in
train)
    mkdir -p "$RUN"
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
    "$PY" benchmarks/bench_training.py --device "${DEVICE:-cuda}" --arch "${ARCH:-resnet152}" \
        --image-size "${IMAGE_SIZE:-224}" --batch-size "${BATCH:-64}" --rounds "${BENCH_ROUNDS:-10}" \
        --output "$OUT/bench_training.json" 2>&1 | tee "$OUT/train.log"
    "$PY" scripts/train.py --data "${DATA:-data/cxr256}" --output-dir "$RUN" --device "${DEVICE:-cuda}" \
        --arch "${ARCH:-resnet152}" --weights none --preset "${PRESET:-consistency_mixup}" \
        --image-size "${IMAGE_SIZE:-224}" --epochs "${EPOCHS:-100}" ${WARMUP:+--warmup-epochs "$WARMUP"} \
        --batch-size "${BATCH:-64}" ${LR:+--lr "$LR"} --weight-decay 0.05 --workers "${WORKERS:-14}" \
        --time-limit "${MINUTES:-9}" --fit-time-limit --checkpoint-every 1000 --resume auto --no-progress \
        2>&1 | tee -a "$OUT/train.log"
    cp "$RUN/metrics.csv" "$OUT/"
    "$PY" scripts/export.py --checkpoint "$RUN/best.pt" --output "$RUN/export.pt" --half | tee -a "$OUT/train.log"
    rm -f "$RUN"/part_*
    split -b 15M -d -a 2 "$RUN/export.pt" "$RUN/part_"
    ls -l "$RUN" | tee -a "$OUT/train.log"
    sha256sum "$RUN/export.pt" | tee -a "$OUT/train.log"
    cp "$RUN"/part_0[0-3] "$OUT/"  # 60 MiB: with the log, under the 64 MiB a call may return
    ;;
finish)
    # The audit runs here, not after training, so that the training call can use all of its 600 s.
    copy_parts 4
    if [ -d data/cxr_test/test ]; then audit_to_out "$RUN/export.pt"; fi
    ;;
fetch)
    copy_parts $(( ${2:?fetch needs 0 or 1} * 4 ))
    ls -l "$OUT"
    ;;
compare)
    results=runs/compare-results && mkdir -p "$results"
    ln -sfn ../cxr_test/test data/cxr160/test  # LOSO tests each fold on the original test images
    grep -q '^test,' data/cxr160/MANIFEST.csv || tail -n +2 data/cxr_test/MANIFEST.csv >> data/cxr160/MANIFEST.csv
    budget=(--arch resnet18 --weights none --image-size "${IMAGE_SIZE:-96}" --epochs "${EPOCHS:-8}" --batch-size 32
            --lr 1e-3 --device "${DEVICE:-cuda}" --workers "${WORKERS:-14}" --no-progress)
    presets=${PRESETS:-tutorial robust consistency_mixup}
    holdouts=() && for fold in ${HOLDOUTS:-NORMAL:kermany NORMAL:c19rad COVID:cohen COVID:c19rad}; do
        holdouts+=(--holdout "$fold")
    done
    steps=${STEPS:-$(for p in $presets; do echo "train:0:$p"; done; for p in $presets; do echo "loso:0:$p"; done
                     for s in 1 2; do for p in $presets; do echo "train:$s:$p"; done; done)}
    for step in $steps; do  # kind:seed:preset, most wanted first
        IFS=: read -r kind seed preset <<< "$step"
        name="$preset-s$seed" && start=$(date +%s)
        if [ "$kind" = train ]; then
            mkdir -p "$results/$name"
            "$PY" scripts/train.py --data data/cxr160 --output-dir "runs/compare/$name" --preset "$preset" \
                "${budget[@]}" --seed "$seed" > "$results/$name/train.log" 2>&1
            echo "train_seconds $(( $(date +%s) - start ))" >> "$results/$name/train.log"
            cp "runs/compare/$name/metrics.csv" "$results/$name/"
            "$PY" scripts/audit.py --checkpoint "runs/compare/$name/best.pt" --data data/cxr_test/test \
                --manifest data/cxr_test/MANIFEST.csv --output-dir "$results/$name/audit" \
                --device "${DEVICE:-cuda}" --workers "${WORKERS:-15}" ${AUDIT_LIMIT:+--limit "$AUDIT_LIMIT"} \
                > "$results/$name/audit.log" 2>&1
            rm -f "$results/$name"/audit/*.png
        else
            "$PY" scripts/loso.py --data data/cxr160 --output-dir "runs/loso/$name" --preset "$preset" \
                "${budget[@]}" --seed "$seed" "${holdouts[@]}" > "$results/loso-$name.log" 2>&1
            cp "runs/loso/$name/loso.json" "$results/loso-$name.json"
        fi
        echo "$step: $(( $(date +%s) - start )) s" | tee -a "$OUT/compare.log"
        tar -cf "$OUT/compare.tar" -C runs compare-results
    done
    ;;
keep)
    mkdir -p runs/keep && cp runs/dev/a/a.bin runs/keep/ && ls -l runs/keep
    ;;
audit)
    mkdir -p "$RUN" && cat runs/keep/a.bin runs/dev/b/b.bin > "$RUN/audited.pt"
    audit_to_out "$RUN/audited.pt"
    ;;
*)
    echo "usage: OUT=DIR $0 train | finish | fetch 0|1 | keep | audit | compare" >&2
    exit 2
    ;;
esac
