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
#                                                    RECIPE: the recipe options (default: the preset docs/audit.md
#                                                    proposes, "--preset consistency_mixup"; the shipped
#                                                    2026.11.27-4: RECIPE="--recipe robust --resize letterbox")
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
# Recipe comparison at one small budget (resnet18, IMAGE_SIZE 96, EPOCHS 8: docs/audit.md's table), with seeds:
#   here:    .venv/bin/python scripts/compact_data.py --data ../shared/data/cxr --output data/cxr160 --max-side 160
#            and data/cxr_test as above
#   device:  bash scripts/gpu_run.sh compare        (carry data/cxr160 and data/cxr_test). STEPS lists kind:seed:config,
#                                                    e.g. "train:1:robust loso:0:tutorial"; default: seed 0 of each
#                                                    of CONFIGS, their LOSO (4 folds), then seeds 1 and 2. A train
#                                                    step is audited on the full test split (no heatmaps). Small
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
    tar -cf "$OUT/audit.tar" -C "$RUN" audit  # audit + heatmaps: more files than a call may return one by one
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
        --arch "${ARCH:-resnet152}" --weights none --zero-init-residual ${RECIPE:---preset consistency_mixup} \
        --image-size "${IMAGE_SIZE:-224}" --epochs "${EPOCHS:-100}" --warmup-epochs "${WARMUP:-3}" \
        --batch-size "${BATCH:-64}" --lr "${LR:-1.5e-3}" --weight-decay 0.05 --workers "${WORKERS:-14}" \
        --model-ema --model-ema-half-life 2 --time-limit "${MINUTES:-9}" --fit-time-limit \
        --checkpoint-every 1000 --resume auto --no-progress \
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
    # robust squashes since 2026-11-27; the comparison in docs/audit.md named robust_letterbox "robust" and
    # robust "robust_squash"
    declare -A options=([tutorial]="--recipe tutorial" [robust_letterbox]="--recipe robust --resize letterbox"
                        [robust]="--recipe robust" [robust_no_equalize]="--recipe robust --intensity none"
                        [robust_equalize_foreground]="--recipe robust --intensity equalize_foreground"
                        [robust_autocontrast]="--recipe robust --intensity autocontrast"
                        [robust_hflip]="--recipe robust --hflip 0.5"
                        [tutorial_equalize]="--recipe tutorial --intensity equalize")
    for augmentation in acquisition crop affine erasing; do  # single-augmentation ablations
        options[robust_no_$augmentation]="--recipe robust --robust-without $augmentation"
    done
    options[robust_bare]="--recipe robust$(printf -- ' --robust-without %s' acquisition crop affine erasing)"
    options[robust_rotate20]="--recipe robust --affine-degrees 20"  # the tutorial recipe rotates up to 20
    options[robust_rotate20_hflip]="--recipe robust --affine-degrees 20 --hflip 0.5"
    options[robust_bare_rotate20_hflip]="--recipe robust$(printf -- ' --robust-without %s' acquisition crop erasing)\
 --affine-degrees 20 --hflip 0.5"  # tutorial_equalize + translate, scale
    # The additive direction: the tutorial recipe with equalisation, written as the robust recipe with every
    # augmentation left out but the affine moves (rotation up to 20 degrees, no shifts, no scaling) and flips, plus
    # one robust augmentation at a time
    for augmentation in acquisition crop erasing; do
        others=$(printf -- ' --robust-without %s' $(printf '%s\n' acquisition crop erasing | grep -vx "$augmentation"))
        options[tutorial_equalize_$augmentation]="--recipe robust$others --affine-degrees 20 --affine-translate 0\
 --affine-scale 0 --hflip 0.5"
    done
    # The full robust recipe with rotation only (the affine's shifts and scaling off) and flips; with random frames
    options[robust_rotation_only]="--recipe robust --affine-degrees 20 --affine-translate 0 --affine-scale 0 --hflip 0.5"
    options[robust_rotation_only_frame]="${options[robust_rotation_only]} --random-frame 0.3"
    # Border trimming (--trim-borders): the tutorial with equalisation, alone and with random resized crops
    options[tutorial_equalize_trim]="${options[tutorial_equalize]} --trim-borders"
    options[tutorial_equalize_crop_trim]="${options[tutorial_equalize_crop]} --trim-borders"
    # Milder framing moves with trimming: centred zooms of 0.8-1.2 in place of crops, or crops that keep 70 % of the area
    options[tutorial_equalize_zoom_trim]="--recipe robust$(printf -- ' --robust-without %s' acquisition crop erasing)\
 --affine-degrees 20 --affine-translate 0 --affine-scale 0.2 --hflip 0.5 --trim-borders"
    options[tutorial_equalize_crop70_trim]="${options[tutorial_equalize_crop_trim]} --crop-scale 0.7"
    # Mixing films: mixup at torchvision's 0.2 on the framing-moves candidate that meets the flip targets, and on
    # the base without framing moves
    options[tutorial_equalize_crop70_trim_mixup]="${options[tutorial_equalize_crop70_trim]} --mixup-alpha 0.2"
    options[tutorial_equalize_trim_mixup]="${options[tutorial_equalize_trim]} --mixup-alpha 0.2"
    # Consistency between views: the class loss on the tutorial_equalize_trim view, AugMix's Jensen-Shannon term
    # (weight 12) against a view through the default robust recipe's augmentations
    options[tutorial_equalize_trim_consistency]="${options[tutorial_equalize_trim]} --consistency-weight 12"
    # ... and with mixup 0.2 on top, both views of a film mixed alike
    options[tutorial_equalize_trim_consistency_mixup]="${options[tutorial_equalize_trim_consistency]} --mixup-alpha 0.2"
    # ... with a half, a quarter, an eighth and a sixteenth of the consistency weight, to buy back val accuracy
    for weight in 6 3 1.5 0.75; do
        options[tutorial_equalize_trim_consistency${weight/./p}_mixup]="${options[tutorial_equalize_trim]}\
 --consistency-weight $weight --mixup-alpha 0.2"
    done
    # ... with stronger mixing: mixup 0.4, or torchvision's reference pair (mixup 0.2 or CutMix 1.0 per batch)
    options[tutorial_equalize_trim_consistency6_mixup4]="${options[tutorial_equalize_trim]} --consistency-weight 6\
 --mixup-alpha 0.4"
    options[tutorial_equalize_trim_consistency6_mixup_cutmix]="${options[tutorial_equalize_trim_consistency6_mixup]}\
 --cutmix-alpha 1.0"
    for percent in 20 40; do  # milder acquisition changes: a lower share of films than the default 80 %
        options[robust_acquisition$percent]="--recipe robust --acquisition-probability 0.$percent"
    done
    configs=${CONFIGS:-tutorial robust_letterbox robust}
    holdouts=() && for fold in ${HOLDOUTS:-NORMAL:kermany NORMAL:c19rad COVID:cohen COVID:c19rad}; do
        holdouts+=(--holdout "$fold")
    done
    steps=${STEPS:-$(for c in $configs; do echo "train:0:$c"; done; for c in $configs; do echo "loso:0:$c"; done
                     for s in 1 2; do for c in $configs; do echo "train:$s:$c"; done; done)}
    for step in $steps; do  # kind:seed:config, most wanted first
        IFS=: read -r kind seed config <<< "$step"
        name="$config-s$seed" && start=$(date +%s)
        if [ "$kind" = train ]; then
            mkdir -p "$results/$name"
            "$PY" scripts/train.py --data data/cxr160 --output-dir "runs/compare/$name" ${options[$config]} \
                "${budget[@]}" --seed "$seed" > "$results/$name/train.log" 2>&1
            echo "train_seconds $(( $(date +%s) - start ))" >> "$results/$name/train.log"
            cp "runs/compare/$name/metrics.csv" "$results/$name/"
            "$PY" scripts/audit.py --checkpoint "runs/compare/$name/best.pt" --data data/cxr_test/test \
                --manifest data/cxr_test/MANIFEST.csv --output-dir "$results/$name/audit" --heatmaps off \
                --device "${DEVICE:-cuda}" --workers "${WORKERS:-15}" ${AUDIT_LIMIT:+--limit "$AUDIT_LIMIT"} \
                > "$results/$name/audit.log" 2>&1
            rm -f "$results/$name"/audit/*.png
        else
            "$PY" scripts/loso.py --data data/cxr160 --output-dir "runs/loso/$name" ${options[$config]} \
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
