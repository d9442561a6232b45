#!/usr/bin/env bash
# Re-measure everything on an H200 with as few device calls as possible. Each named part has its
# own time limit; all output goes to $OUT/run/ and is packed into $OUT/run.tgz (one file comes back).
#   OUT=dir bash scripts/h200_session.sh verify attention qmm      (~8 min)
#   OUT=dir bash scripts/h200_session.sh seed scaling profile      (~8 min)
#   OUT=dir bash scripts/h200_session.sh verify-quick modelcheck overhead tune   (~9 min)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
R=$OUT/run
mkdir -p "$R"
# which code ran: match with `bash scripts/tree_hash.sh <commit>` (git metadata there may be stale)
TREE=$(bash scripts/tree_hash.sh 2>/dev/null || true)
[ -f "$R/tree.txt" ] || echo "$TREE" > "$R/tree.txt"
# EXPECT_TREE=<hash of `bash scripts/tree_hash.sh <commit>` here>: stop before measuring when the
# device's copy is another tree (session 33's call8 measured a stale copy as the new side of an A/B)
if [ -n "${EXPECT_TREE:-}" ] && [ "$TREE" != "$EXPECT_TREE" ]; then
  echo "h200_session: this tree is $TREE, not EXPECT_TREE=$EXPECT_TREE" >&2
  exit 3
fi
part() {  # name, seconds, command...
  local name=$1 t=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$t" "$@" > "$R/$name.txt" 2>&1
  echo "rc=$?"
  tail -n "${TAIL:-14}" "$R/$name.txt"
}
M=(-m preset:qwen2.5-7b --quant q4_0)
# the decode step of the 7B shape (attention excluded) with its CUPTI kernel time and top kernels:
# decode_prof NAME [SETTING=VALUE ...] (settings for an A/B go into the environment)
decode_prof() {
  local name=$1
  shift
  part "$name" 150 env "$@" OUT="$R/$name" QMM_SECTIONS=decode QMM_VARIANTS=ours QMM_DECODE=ours_epilogues \
    QMM_DECODE_PROFILE=1 QMM_BUDGET_S=130 python3 scripts/h200_qmm.py
}
# Nsight Compute of h200_ncu.py's 4-bit matmuls (NCU_M, NCU_NAMES, NCU_EXTRA; NCU_KERNEL=bb_qm also
# takes the int8 kernel's bb_qmv8 launches): ncu_qmm NAME
ncu_qmm() {
  part "$1" 240 env PARTS=qmm NCU_M="${NCU_M:-1}" NCU_NAMES="${NCU_NAMES:-qkv,o,down}" \
    "$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1 || echo ncu)" \
    --clock-control none --kernel-name "regex:${NCU_KERNEL:-bb_qmm}" --launch-skip 0 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats ${NCU_EXTRA:-} --print-details all python3 scripts/h200_ncu.py
}
# the decode step at each LABEL@VALUE of one setting in turn (A/B runs): ab_switch PREFIX VAR B LABEL@VALUE ...
# (B: QMM_DECODE_B; other settings go into the environment before the call)
ab_switch() {
  local prefix=$1 var=$2 b=$3 v
  shift 3
  for v in "$@"; do
    decode_prof "$prefix-${v%%@*}" "$var=${v#*@}" QMM_DECODE_B="$b"
  done
}
# verify-quick (qmm, qmm-rope) and the 1.5B model against its pure-MLX twins with SETTING=VALUE ... on:
# switch_check TAG MODEL_SECONDS MODEL_CHECK_CASES SETTING=VALUE ... (BATCHBENCH_VERIFY_MATCH among
# them narrows the cases, MODEL_CHECK_KERNELS=1 lists the model's kernels)
switch_check() {
  local tag=$1 model_s=$2 cases=$3
  shift 3
  part "verify-gpu-quick-$tag" 200 env "$@" BATCHBENCH_VERIFY_QUICK=1 BATCHBENCH_VERIFY_ONLY=qmm,qmm-rope \
    OUT="$R" python3 -m batchbench.verify.gpu
  part "model-check-$tag" "$model_s" env "$@" MODEL_CHECK_CASES="$cases" python3 scripts/gpu_model_check.py qwen2.5-1.5b
}
for what in "$@"; do
  case $what in
    verify) part verify-gpu 300 python3 -m batchbench.verify.gpu ;;
    # 98 cases (session 26): more than 200 s; rows print as cases end
    verify-quick) part "verify-gpu-quick${TAG:+-$TAG}" 420 env BATCHBENCH_VERIFY_QUICK=1 OUT="$R" python3 -m batchbench.verify.gpu ;;
    modelcheck) part model-check 150 python3 scripts/gpu_model_check.py small ;;
    overhead) part overhead 150 env OUT="$R" OPS=0 python3 scripts/h200_overhead.py 1 32 ;;
    ops) part ops 150 env OUT="$R" OPS=1 python3 scripts/h200_overhead.py 1 ;;
    tune) part qmm-tune 200 env OUT="$R" TUNE_GRID=small TUNE_BUDGET_S=170 python3 scripts/h200_qmm_tune.py ;;
    attention) part attention 240 env OUT="$R" python3 scripts/h200_attention.py ;;
    qmm) part qmm 200 env OUT="$R" QMM_BUDGET_S=180 python3 scripts/h200_qmm.py ;;
    # the per-matrix table alone (~60 s; the whole script's budget can run out before it, as in
    # session 31's call6): issue 7's matrices and the model's fused launches, CUPTI kernel time
    qmm-table) part qmm-table 180 env OUT="$R/qmm-table" QMM_SECTIONS=kernels,profile QMM_BUDGET_S=160 \
                 python3 scripts/h200_qmm.py ;;
    seed) part seed 170 python3 -m batchbench "${M[@]}" -c 40000 -b 2048 -ub 512 -npp 0,512,4096,8192 \
            -ntg 32 -npl 2,3 -fa on --ab all --csv "$R/seed.csv" ;;
    scaling) part scaling 260 python3 -m batchbench "${M[@]}" -c 140000 -npp 4096 -ntg 32 \
            -npl 1,2,4,8,16,32 -fa on --ab all --csv "$R/scaling.csv" ;;
    profile) part profile 120 python3 scripts/profile_step.py 1 8 32 ;;
    # TAG=name names the files (A/B runs: environment before the command, e.g. BB_QMM_ROPE=0)
    scaling-quick) part "scaling-quick${TAG:+-$TAG}" 150 python3 -m batchbench "${M[@]}" -c 140000 -npp 4096 \
            -ntg 32 -npl "${NPL:-1,2,4,32}" -fa on --csv "$R/scaling-quick${TAG:+-$TAG}.csv" ;;
    tune-small) part "qmm-tune-small" 200 env OUT="$R" TUNE_GRID=small TUNE_M="${TUNE_M:-1,32}" TUNE_BUDGET_S=170 \
            python3 scripts/h200_qmm_tune.py ;;
    # the register pipeline against the cp.async ring (QmmConfig.ns), M = 1, 8, 32
    tune-ring) part "qmm-tune-ring" 200 env OUT="$R" TUNE_GRID=ring TUNE_M="${TUNE_M:-1,8,32}" TUNE_BUDGET_S=170 \
            python3 scripts/h200_qmm_tune.py ;;
    # M=32: 512-thread blocks with the ring, both dequantizations
    tune-m32) part "qmm-tune-m32" 240 env OUT="$R" TUNE_GRID=m32 TUNE_M=32 TUNE_BUDGET_S=220 \
            python3 scripts/h200_qmm_tune.py ;;
    # per-block phase timestamps of the attention kernel (timeline build)
    attn-timeline) part attn-timeline 120 env OUT="$R" python3 scripts/h200_attn_timeline.py ${ATTN_CASES:-1x4096 2x4096 8x8192 32x8192} ;;
    # bench-attention at small B under launch-geometry settings (the kernel's env knobs)
    attn-sweep) for v in "BB_ATTN_WAVE=1" "BB_ATTN_WAVE=0.5" "BB_ATTN_WAVE=2" "BB_ATTN_STAGES=3" \
                         "BB_ATTN_WARPS=2 BB_ATTN_STAGES=4" "BB_ATTN_WARPS=8 BB_ATTN_STAGES=1"; do
          part "attn-sweep-$(echo "$v" | tr ' =' '_-')" 60 env $v python3 -m batchbench bench-attention \
            --b "${ATTN_B:-1,2,8}" --ctx 4096 --variants list,model
        done ;;
    # persistent grids with the same number of tiles per block (narrow matrices at M = 1 and 8)
    tune-balance) part "qmm-tune-balance${TAG:+-$TAG}" 200 env OUT="$R" TUNE_GRID=balance TUNE_M="${TUNE_M:-1,8}" \
            TUNE_NAMES="${TUNE_NAMES:-qkv,o_proj,down,gate_up}" TUNE_BUDGET_S=170 python3 scripts/h200_qmm_tune.py ;;
    # K-slices for the narrow matrices at M = 1 and 8 (s9 call3 ran it on the fix-up branch)
    tune-split) part "qmm-tune-split${TAG:+-$TAG}" 200 env OUT="$R" TUNE_GRID=split TUNE_M="${TUNE_M:-1,8}" \
            TUNE_NAMES="${TUNE_NAMES:-o_proj,qkv,down}" TUNE_BUDGET_S=170 python3 scripts/h200_qmm_tune.py ;;
    attention-table) part attention-table 200 python3 -m batchbench bench-attention --b 2,3,8,32 \
            --ctx 4096,8192 --out "$R/attention-table.md" ;;
    # the preset exported as Q4_0 GGUF, then the quick scaling sweep on the file
    gguf) part gguf-export 90 python3 -m batchbench export-gguf --preset qwen2.5-7b --type q4_0 /tmp/bb-7b-q4_0.gguf
          part gguf-scaling-quick 180 python3 -m batchbench -m /tmp/bb-7b-q4_0.gguf -c 140000 -npp 4096 -ntg 32 \
            -npl "${NPL:-1,2,4,32}" -fa on --csv "$R/gguf-scaling-quick.csv" ;;
    # A/B of our matmul only (kernel chain, CUPTI kernel time, decode step with the epilogues), TAG names it
    qmm-ab) part "qmm-ab${TAG:+-$TAG}" 175 env OUT="$R/qmm-ab${TAG:+-$TAG}" QMM_SECTIONS=kernels,profile,decode \
            QMM_VARIANTS=ours QMM_DECODE=ours_epilogues QMM_BUDGET_S=160 python3 scripts/h200_qmm.py ;;
    # A/B of the attention kernel only (ours with live lists, and the model's call), TAG names it
    attn-ab) part "attn-ab${TAG:+-$TAG}" 120 python3 -m batchbench bench-attention --b "${ATTN_B:-1,2,3,8,32}" \
            --ctx 4096,8192 --variants list,model --out "$R/attn-ab${TAG:+-$TAG}.md" ;;
    # the card's read-only bandwidth (a ceiling for the attention kernel) beside MLX's copy
    readbw) part readbw 150 env OUT="$R" python3 scripts/h200_readbw.py ;;
    # decode tokens in blocks of their own sequence (--own-blocks) against llama.cpp's placement
    ab-own) part ab-own 240 python3 -m batchbench "${M[@]}" -c 140000 -npp 4096 -ntg 32,256 \
            -npl "${NPL:-8,32}" -fa on --ab own --csv "$R/ab-own.csv" ;;
    # do thread-block clusters (compile-time __cluster_dims__) work through mx.fast.cuda_kernel?
    cluster-probe) part cluster-probe 60 python3 scripts/h200_cluster_probe.py ;;
    # the split merge spread over the last K arrivers (pollers), and plain reads on 128-132 blocks
    merge-probe) part merge-probe 240 env OUT="$R" python3 scripts/h200_merge_probe.py ;;
    qmm-decode-prof) decode_prof "qmm-decode-prof${TAG:+-$TAG}" ;;
    # BB_QMM_NORM_PRE's checks (~5 min): its kernels on the GPU (verify-quick), the model with it
    # against the pure-MLX twins; norm-pre-ab (~5 min): the decode step at B = 1-8 with it off /
    # on, twice, and what the fused norm costs each consumer (BB_QMM_FUSE_NORM=0: a separate
    # rms_norm). One call's limit (600 s) holds one of the two (session 21 ran them as one part)
    norm-pre) switch_check normpre 200 "1:64:2,2:64:2,4:40:2" BB_QMM_NORM_PRE=1 ;;
    norm-pre-ab) ab_switch qmm-decode-prof-pre BB_QMM_NORM_PRE 1,2,4,8 off@0 on@1 off2@0 on2@1
              decode_prof "qmm-decode-prof-nofuse" QMM_DECODE_B=1,2,8 BB_QMM_FUSE_NORM=0 ;;
    # BB_QMM_WK_DIVIDE=1: seven warps along K instead of eight where K = 3584 (28 chunks of 128:
    # 3.5 a warp with eight, so half the warps wait at each tile's barrier; four with seven): the
    # gate/up pair at M=1, o_proj at M = 1-8 and q/k/v at M = 2-8 (~4 min: the decode step at
    # DECODE_B, default 1, 2, 8, twice each way)
    ab-wk) ab_switch qmm-decode-prof BB_QMM_WK_DIVIDE "${DECODE_B:-1,2,8}" base@0 wd@1 base2@0 wd2@1 ;;
    # BB_QMM_WK_DIVIDE=narrow (o_proj and q/k/v only: session 22's ab-wk lost on the gate/up
    # pair): ab-wkn (~4 min) the decode step at B = 1, 2, 4, 8, twice each way; wkn-check (~4 min)
    # verify-quick (qmm, qmm-rope) and the 1.5B model against its pure-MLX twins with it on
    ab-wkn) ab_switch qmm-decode-prof-wkn BB_QMM_WK_DIVIDE "${DECODE_B:-1,2,4,8}" \
             base@0 wn@narrow base2@0 wn2@narrow ;;
    wkn-check) switch_check wkn 200 "1:64:2,2:64:2,8:32:2" BB_QMM_WK_DIVIDE=narrow ;;
    # BB_QMM_RED_VEC=glu (session 22's ab-redvec: the gate product's reduce gained, the RoPE
    # pair's lost): ab-redglu (~3 min) the decode step at B = 16, 32, twice each way
    ab-redglu) ab_switch qmm-decode-prof-redglu BB_QMM_RED_VEC 16,32 base@0 rg@glu base2@0 rg2@glu ;;
    # BB_QMM_SB_PACK=1 (each layer's scales and biases also packed as (scale, bias) pairs: the
    # matmuls load one word a row and chunk instead of two halves; nvcc: 84-93 registers instead
    # of 114-120 for gate/up, down and o_proj at M=1). sbpack-check (~4 min): verify-quick (qmm,
    # qmm-rope) and the 1.5B model against its pure-MLX twins with BB_QMM_SB_PACK=$SB_PACK (default
    # norope; session 23's three model cases took more than 200 s); ab-sbpack (~4 min):
    # the decode step at DECODE_B (default 1, 2, 8, 32), twice each way
    sbpack-check) switch_check "sbpack-${SB_PACK:-norope}" 330 "1:64:2,8:32:2,32:16:2" BB_QMM_SB_PACK="${SB_PACK:-norope}" ;;
    ab-sbpack) ab_switch qmm-decode-prof-sbpack BB_QMM_SB_PACK "${DECODE_B:-1,2,8,32}" base@0 sp@1 base2@0 sp2@1 ;;
    # BB_QMM_SB_PACK=norope (session 23: q/k/v with its RoPE epilogue lost 0.3-0.4 us at M = 1, 2,
    # 8 with the pairs, every other matmul gained): those calls read the two arrays (~2.5 min)
    ab-norope) ab_switch qmm-decode-prof-norope BB_QMM_SB_PACK "${DECODE_B:-1,8}" sp@1 nr@norope sp2@1 nr2@norope ;;
    # with the packing, down at M = 1-2 on three chunks a stage (nvcc: 128 registers, two blocks
    # an SM; unpacked 152, one block: measured slower in session 17) against two (~3 min)
    ab-sbpack-p3) BB_QMM_SB_PACK=1 ab_switch qmm-decode-prof-sbpack QMM_PATCH 1,2 \
             sp@ p3@down:1-2:p=3 sp2@ p32@down:1-2:p=3 ;;
    # session 21's three prepared switches (measured in session 22, results/h200-2026-11-30-s22).
    # prep-check (~4 min): verify-quick (qmm, qmm-rope) and the 1.5B model against its pure-MLX
    # twins (B = 1, 16) with all three on;
    # then each A/B alone, the decode step twice each way: ab-dq (BB_QMM_DQ=lop3b, one token's
    # weights dequantized without their bias; B = 1, 2, B=2 a control, ~3 min), ab-wk (above),
    # ab-redvec (BB_QMM_RED_VEC=1, four pairs a thread in the pair reduce; B = 16, 32, ~3 min)
    prep-check) switch_check prep 200 "1:64:2,16:16:2" BB_QMM_DQ=lop3b BB_QMM_WK_DIVIDE=1 BB_QMM_RED_VEC=1 ;;
    ab-dq) ab_switch qmm-decode-prof-dq BB_QMM_DQ 1,2 base@lop3 b@lop3b base2@lop3 b2@lop3b ;;
    ab-redvec) ab_switch qmm-decode-prof-redvec BB_QMM_RED_VEC 16,32 base@0 rv@1 base2@0 rv2@1 ;;
    # the 4-bit matmuls' persistent grids in one wave (BB_QMM_ONE_WAVE=1, 2: K-slices balanced) against the default
    ab-wave) for v in 0 1 2; do
               decode_prof "qmm-decode-prof-wave$v" BB_QMM_ONE_WAVE=$v
             done
             for v in 0 1 2; do
               part "scaling-quick-wave$v" 150 env BB_QMM_ONE_WAVE=$v python3 -m batchbench "${M[@]}" -c 140000 \
                 -npp 4096 -ntg 32 -npl 16,32 -fa on --csv "$R/scaling-quick-wave$v.csv"
             done ;;
    # launch geometries of the decode step's matmuls (scripts/h200_qmm.py's QMM_PATCH), each
    # checked against mx.dequantize first: CFG_AB="tag@patch ..." ("base@": no patch), at DECODE_B
    # (files qmm-decode-prof-TAG-bB: runs at two B with the same tags keep both, session 31 lost one)
    ab-cfg) for v in ${CFG_AB:-base@}; do
               decode_prof "qmm-decode-prof-${v%%@*}-b${DECODE_B:-1}" QMM_PATCH="${v#*@}" QMM_DECODE_B="${DECODE_B:-1}"
             done ;;
    # decode-step A/B of environment settings: ENV_AB="tag@VAR=val,VAR2=val tag2@..." at DECODE_B
    ab-env) for v in ${ENV_AB:-base@}; do
               decode_prof "qmm-decode-prof-${v%%@*}-b${DECODE_B:-1}" QMM_DECODE_B="${DECODE_B:-1}" $(echo "${v#*@}" | tr ',' ' ')
             done ;;
    # both weight stages in flight before the x staging (BB_QMM_PRELOAD2=1 everywhere, auto: where
    # measured faster) against one (0), twice each; PRELOAD_AB="0 1 0 1" by default
    ab-preload) i=0
             for v in ${PRELOAD_AB:-0 1 0 1}; do
               i=$((i + 1))
               decode_prof "qmm-decode-prof-preload$v-$i" BB_QMM_PRELOAD2=$v
             done ;;
    # the fused RMSNorm's variants at B = 1, 2, 4, 8 (DECODE_B): NORM_AB lists BB_QMM_NORM_PASS/BB_QMM_NW_EARLY
    # pairs, by default each of the four twice, interleaved (session 15's check of the per-launch
    # choice: NORM_AB="auto/auto 0/0 auto/auto 0/0" DECODE_B=1,2,4,8,32)
    ab-norm) i=0
             for v in ${NORM_AB:-0/0 1/0 0/1 1/1 0/0 1/0 0/1 1/1}; do
               i=$((i + 1))
               decode_prof "qmm-decode-prof-norm${v/\//-}-$i" BB_QMM_NORM_PASS="${v%/*}" BB_QMM_NW_EARLY="${v#*/}" \
                 QMM_DECODE_B="${DECODE_B:-1,2,4,8}"
             done ;;
    # skip against no-skip where the host sets the pace (B <= 2), repeated: is skipping's
    # whole-cache window a cost there? (session 14's sweep read no-skip 1.11-1.18x at B = 1-2)
    skip-small) part skip-small 200 python3 -m batchbench "${M[@]}" -c 140000 -npp 4096 -ntg 128 \
            -npl 1,2 -fa on --ab skip -r 3 --csv "$R/skip-small.csv" ;;
    # whole decode steps of the benchmark's TG loop under the profiler: host latency and gaps per step
    step-trace) part "step-trace${TAG:+-$TAG}" 240 env OUT="$R/step-trace${TAG:+-$TAG}" \
            python3 scripts/h200_step_trace.py ${TRACE_B:-1 8 32} ;;
    qmm-step) part qmm-step 220 env OUT="$R" QMM_SECTIONS=kernels,decode,profile QMM_BUDGET_S=200 \
            python3 scripts/h200_qmm.py ;;
    # the plain matmuls' kernel time with every call on the same weights (QMM_HOT=1, L2-hot where
    # they fit) against rotating copies: how much of a small matmul's time is not the weight read
    qmm-hot) for v in 0 1; do
               part "qmm-hot$v" 150 env OUT="$R/qmm-hot$v" QMM_HOT=$v QMM_SECTIONS=profile QMM_VARIANTS=ours \
                 QMM_BUDGET_S=130 python3 scripts/h200_qmm.py
             done ;;
    # Nsight Compute on the decode step's matmuls (scripts/h200_ncu.py; NCU_M, NCU_NAMES pick them;
    # NCU_EXTRA: more ncu options, e.g. "--section SourceCounters")
    ncu-qmm) ncu_qmm "ncu-qmm${TAG:+-$TAG}" ;;
    # the decode step with its layers chained (as always) and independent (QMM_DECODE_INDEP=1: MLX may
    # run several layers at once); the GPU spans bound what overlapping the matmuls could gain
    ab-indep) ab_switch qmm-decode-prof-indep QMM_DECODE_INDEP "${DECODE_B:-1,8,32}" dep@0 indep@1 dep2@0 indep2@1 ;;
    # one launch a matmul against one persistent launch a layer, on plain streaming reads of the 7B
    # layer's bytes (scripts/h200_phase_probe.py, ~1 min)
    phase-probe) part phase-probe 150 env BLOCKS_PER_SM="${BLOCKS_PER_SM:-1,2,3}" python3 scripts/h200_phase_probe.py ;;
    # the int8-activation matrix-vector kernel (kernels/qmv8.py) against the fp16 path on the 7B matrices
    x8) part x8 200 env X8_BPS="${X8_BPS:-2,4}" python3 scripts/h200_x8.py ;;
    # the decode step with BB_QMM_X8 off and on (the int8-activation kernel where qmm dispatches
    # to it; B = 1, 2, 3), twice
    ab-x8) ab_switch qmm-decode-prof-x8 BB_QMM_X8 "${DECODE_B:-1,2,3}" base@0 x8@1 base2@0 x82@1 ;;
    # the subnormal dequantization (BB_QMM_DQ=sub: two instructions a pair of fp16 weights) against
    # lop3, twice each way
    ab-sub) ab_switch qmm-decode-prof-sub BB_QMM_DQ "${DECODE_B:-1,2,8,32}" base@lop3 sub@sub base2@lop3 sub2@sub ;;
    # the 1.5B model against its twins with BB_QMM_DQ=sub (B >= 3: the fp16 kernels; the last case
    # compares 100 steps' argmax)
    model-sub) part model-check-sub 240 env BB_QMM_DQ=sub MODEL_CHECK_KERNELS=1 \
                 MODEL_CHECK_CASES="${SUB_CASES:-3:64:2,8:64:2,32:32:2,8:32:100}" python3 scripts/gpu_model_check.py qwen2.5-1.5b ;;
    # the weights repacked in the fp16 kernel's load order (BB_QMM_WPACK=1, prepared in session 27):
    # its verify cases against float64 and the 1.5B model against its twins, then the decode step
    # with it off and on, twice (B = 1, 2, 8, 32)
    wpack-check) switch_check wpack 240 "${WPACK_CASES:-2:64:2,8:64:2,32:32:2,8:32:100}" BB_QMM_WPACK=1 \
                   BATCHBENCH_VERIFY_MATCH=-wpack MODEL_CHECK_KERNELS=1 ;;
    ab-wpack) ab_switch qmm-decode-prof-wpack BB_QMM_WPACK "${DECODE_B:-1,2,8,32}" base@0 wp@1 base2@0 wp2@1 ;;
    # the pairs repacked too (BB_QMM_WPACK=pairs): the -pairs verify.gpu cases and the 1.5B model, then
    # the decode step against the weights alone (1), twice each way
    pairs-check) switch_check pairs 240 "${PAIRS_CASES:-2:64:2,8:64:2,32:32:2,8:32:100}" BB_QMM_WPACK=pairs \
                   BATCHBENCH_VERIFY_MATCH=-pairs MODEL_CHECK_KERNELS=1 ;;
    ab-pairs) ab_switch qmm-decode-prof-pairs BB_QMM_WPACK "${DECODE_B:-2,8,32}" wp@1 pr@pairs wp2@1 pr2@pairs ;;
    # fp16 partials after a split K (BB_QMM_PART16, session 29): the split verify.gpu cases (qmm,
    # qmm-rope) and the 1.5B model against its twins, then the decode step with it off and on, twice
    part16-check) switch_check part16 120 "${PART16_CASES:-32:32:2,8:32:2}" BB_QMM_PART16=1 \
                    BATCHBENCH_VERIFY_MATCH=fp16,-split MODEL_CHECK_KERNELS=1 ;;
    ab-part16) ab_switch qmm-decode-prof-part16 BB_QMM_PART16 "${DECODE_B:-8,32}" off@0 on@1 off2@0 on2@1 ;;
    # the plain split-K reduce (lm_head's at M > 8) one element a thread against 8 (the default since
    # session 30), twice each
    ab-redplain) ab_switch qmm-decode-prof-redplain QMM_RED_PLAIN_VEC "${DECODE_B:-32}" v1@1 v8@8 v12@1 v82@8 ;;
    # q/k/v with its RoPE epilogue through the int8 kernel too (BB_QMM_X8=1) against without
    # (noqkv), twice; session 25 ran this with the value `qkv`, which is now 1
    ab-x8qkv) ab_switch qmm-decode-prof-x8qkv BB_QMM_X8 "${DECODE_B:-1,2}" x8@noqkv qkv@1 x82@noqkv qkv2@1 ;;
    # the 1.5B model against its twins (the fp16 path) with BB_QMM_X8 off and on (X8_MODEL_V); the last case
    # compares 200 decode steps' argmax (teacher-forced random tokens)
    model-x8) for v in ${X8_MODEL_V:-0 1}; do
             part "model-check-x8-$v" 240 env BB_QMM_X8=$v MODEL_CHECK_KERNELS=1 \
               MODEL_CHECK_CASES="${X8_CASES:-1:300:2,2:64:2,4:64:2,1:32:200}" \
               python3 scripts/gpu_model_check.py qwen2.5-1.5b
           done ;;
    # the cost of a grid-wide barrier in one persistent launch (1-3 blocks an SM, N = 0-32; ~20 s)
    barrier-probe) part barrier-probe 120 python3 scripts/h200_barrier_probe.py ;;
    # the packed pairs under Nsight Compute (session 23: they slowed q/k/v with its RoPE epilogue at
    # M <= 8, and gate/up and q/k/v + o at M=16): NCU_NAMES (default qkv_rope) at NCU_M (default 1)
    # with BB_QMM_SB_PACK 0 and 1, source counters included (~1 min at M=1)
    ncu-sbpack) for v in 0 1; do
             BB_QMM_SB_PACK=$v NCU_NAMES="${NCU_NAMES:-qkv_rope}" NCU_EXTRA="--section SourceCounters" \
               ncu_qmm "ncu-sbpack-${NCU_M:-1}-$v"
           done ;;
    *) echo "unknown part $what (verify verify-quick modelcheck overhead ops tune attention qmm seed scaling profile" \
            "scaling-quick tune-small tune-ring tune-m32 attn-timeline attn-sweep tune-split attention-table gguf qmm-ab" \
            "qmm-table attn-ab readbw cluster-probe merge-probe ab-own qmm-decode-prof ab-wave ab-cfg ab-preload ab-norm skip-small step-trace tune-balance qmm-step qmm-hot ncu-qmm ab-env norm-pre norm-pre-ab ab-wk ab-dq ab-redvec prep-check ab-redglu sbpack-check ab-sbpack ab-sbpack-p3 ab-norope ncu-sbpack barrier-probe ab-indep phase-probe x8 ab-x8 model-x8 ab-x8qkv ab-sub model-sub wpack-check ab-wpack pairs-check ab-pairs part16-check ab-part16 ab-redplain)" ;;
  esac
done
tar czf "$OUT/run.tgz" -C "$OUT" run && echo "packed $OUT/run.tgz"
