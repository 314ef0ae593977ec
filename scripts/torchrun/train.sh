#!/usr/bin/env bash
# Train on several machines with torchrun (no Accelerate launcher, no SLURM): run this on every
# node with the same settings; the c10d rendezvous assigns the node ranks.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 scripts/torchrun/train.sh --section train_voc
#
# The arguments go to `python -m pipeline.train` (default: --section train_voc). pipeline.train
# builds its Accelerator from the environment torchrun sets up (RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR), so it trains exactly as under `accelerate launch`. Environment (all optional):
#
#   NNODES=1                    machines; "MIN:MAX" for an elastic range
#   NPROC_PER_NODE              processes per machine (default: nvidia-smi's GPU count, else 1)
#   RDZV_ENDPOINT               host:port of the rendezvous, reachable from every node
#                               (default: $MASTER_ADDR:$MASTER_PORT, else localhost:29500)
#   RDZV_ID=ssd-train           the job's id: every node of one run uses the same
#   PROJECT_DIR                 directory the training runs in, with params.yaml (default: this checkout)
#   DRY_RUN=1                   print the torchrun command instead of running it
#
# Preemption: SIGTERM to this script (it becomes `python -m pipeline.supervise torchrun ...`)
# reaches every worker, which saves a checkpoint and exits 75; torchrun itself would say 1, the
# supervisor exits 75, what a scheduler that retries on 75 needs. Run the same command again to
# resume from the newest checkpoint. TORCH_ELASTIC_SHUTDOWN_TIMEOUT (100 s) is how long torchrun
# lets the workers save.

set -euo pipefail
cd "${PROJECT_DIR:-$(dirname "$0")/../..}"

if [[ $# -eq 0 ]]; then
    set -- --section train_voc
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
        if [[ "$gpus" -gt 0 ]]; then
            NPROC_PER_NODE="$gpus"
        fi
    fi
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

command=(
    python -m pipeline.supervise
    torchrun
    --nnodes "${NNODES:-1}"
    --nproc_per_node "$NPROC_PER_NODE"
    --rdzv_backend c10d
    --rdzv_endpoint "$RDZV_ENDPOINT"
    --rdzv_id "${RDZV_ID:-ssd-train}"
    --max_restarts 0
    -m pipeline.train "$@"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
if [[ -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
exec "${command[@]}"
