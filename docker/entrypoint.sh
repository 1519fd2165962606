#!/usr/bin/env bash
# Container entry point.
#   prepare  build the GPU model repository from /weights into the cache volume (once), then load every model
#            once so TensorRT writes its engines (and torch.compile its kernels) into the cache; concurrent
#            containers take turns on a lock
#   serve    (default) prepare if needed, then run tritonserver under latentsync-serve (PID 1's process; the
#            server logs to stdout): SIGTERM drains the open streams, then stops Triton; extra args go to
#            latentsync-serve (e.g. --drain-timeout-s)
#   anything else is run as a command
set -euo pipefail

# One folder per model version on the cache volume: bumping LATENTSYNC_MODEL_VERSION (new weights, new
# export options) makes the next start build a fresh repository and engine cache beside the old one.
cache=${LATENTSYNC_CACHE:-/cache}
version=${LATENTSYNC_MODEL_VERSION:-v1}
repo=${LATENTSYNC_REPO:-${cache}/${version}/model_repository}
trt_cache=${LATENTSYNC_TRT_CACHE:-${cache}/${version}/trt}
weights=${LATENTSYNC_WEIGHTS:-/weights}
# torch.compile's caches (LATENTSYNC_EXPORT_ARGS with --compile-unet) on the cache volume too: what `prepare`
# compiled is reused by `serve`, by the other replicas and after restarts, instead of compiling the UNet again
# at every start (minutes on a GPU; on a CPU a cached start compiled in 18-31 s against 104-120, RESULTS.md)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${cache}/${version}/torchinductor}

# The admin key comes from a secret file (compose secrets: LATENTSYNC_ADMIN_KEY_FILE) or the environment
# (Kubernetes secretKeyRef: LATENTSYNC_ADMIN_KEY); latentsync-serve reads either and hands it to tritonserver
# without putting it on a command line.

# Server-wide memory: one CUDA pool per visible GPU (tensors passed between models and Python stubs live
# there), pinned host memory for host<->device copies of video frames.
triton_memory_flags() {
  local n i
  n=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  for ((i = 0; i < n; i++)); do
    echo "--cuda-memory-pool-byte-size=${i}:${LATENTSYNC_CUDA_POOL_BYTES}"
  done
  echo "--pinned-memory-pool-byte-size=${LATENTSYNC_PINNED_POOL_BYTES}"
}

prepare() {
  mkdir -p "$(dirname "$repo")" "${trt_cache}"
  exec 9>"${repo}.lock"
  flock 9
  if [[ ! -f ${repo}/.complete ]]; then
    echo "building the model repository from ${weights}"
    rm -rf "${repo}.partial"
    # /weights/1.6 and /weights/1.5 (either or both), or the files of one 1.5 checkpoint directly in /weights
    local sources=() variant
    for variant in 1.6 1.5; do
      if [[ -d ${weights}/${variant} ]]; then sources+=(--weights "${variant}=${weights}/${variant}"); fi
    done
    if ((${#sources[@]} == 0)); then sources=(--weights "$weights"); fi
    # shellcheck disable=SC2086 # LATENTSYNC_EXPORT_ARGS holds several flags, e.g. --max-streams 4
    latentsync-export "${sources[@]}" --target gpu --trt-cache-dir "${trt_cache}" \
      --out "${repo}.partial" ${LATENTSYNC_EXPORT_ARGS:-}
    rm -rf "$repo"
    mv "${repo}.partial" "$repo"
    touch "${repo}/.complete"
  fi
  echo "loading every model once (TensorRT engines go to ${trt_cache})"
  # shellcheck disable=SC2046 # one flag per line
  latentsync-serve "$repo" --exit-when-ready --grpc-port 0 --http-port 0 --metrics-port 0 \
    -- $(triton_memory_flags)
  exec 9>&-   # unlock; a later exec must not inherit the lock
}

case "${1:-serve}" in
  prepare)
    prepare
    ;;
  serve)
    shift || true
    if [[ -z ${LATENTSYNC_ADMIN_KEY:-}${LATENTSYNC_ADMIN_KEY_FILE:-} ]]; then
      echo "set LATENTSYNC_ADMIN_KEY or LATENTSYNC_ADMIN_KEY_FILE: operators need the key of the admin APIs" >&2
      exit 1
    fi
    [[ -f ${repo}/.complete ]] || prepare
    # shellcheck disable=SC2046 # one flag per line
    exec latentsync-serve "$repo" --log - --address 0.0.0.0 "$@" -- $(triton_memory_flags)
    ;;
  *)
    exec "$@"
    ;;
esac
