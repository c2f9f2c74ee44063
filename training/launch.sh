#!/usr/bin/env bash
# Shared launcher of the step folders: training/launch.sh STAGE DEPLOYMENT [--section.field VALUE ...]
#   STAGE       a registered stage: seqkd | warmup | gad | ... (gadchat/stages/__init__.py)
#   DEPLOYMENT  cpu (NUM_PROCS ranks, default 2) | single_gpu | single_node (NUM_GPUS, default 8)
#               | multi_node (HOSTFILE, MASTER_ADDR required; NUM_NODES optional; NODE_RANK: launch
#                 without ssh, this script started once per node with NODE_RANK 0, 1, ...)
# Every rank runs the same main.py under the `deepspeed` launcher (SPMD); the per-deployment scripts
# under training/*/training_scripts/ only choose the recipe YAML and deployment flags.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${1:?usage: launch.sh STAGE DEPLOYMENT [flags]}
DEPLOYMENT=${2:?usage: launch.sh STAGE DEPLOYMENT [flags]}
shift 2
# The stage's step folder, from the stage registry (gadchat/stages/__init__.py).
STEP_MAIN=$(cd "$ROOT" && python3 -m gadchat.stages "$STAGE") || exit 2  # it names the known stages
PORT=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
case "$DEPLOYMENT" in
  cpu)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    LAUNCH=(deepspeed --num_gpus "${NUM_PROCS:-2}" --master_port "$PORT") ;;
  single_gpu) LAUNCH=(deepspeed --num_gpus 1 --master_port "$PORT") ;;
  single_node) LAUNCH=(deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "$PORT") ;;
  multi_node)
    LAUNCH=(deepspeed --hostfile "${HOSTFILE:?multi_node needs HOSTFILE}" --master_addr "${MASTER_ADDR:?multi_node needs MASTER_ADDR}"
            --master_port "${MASTER_PORT:-29500}")
    if [ -n "${NUM_NODES:-}" ]; then LAUNCH+=(--num_nodes "$NUM_NODES"); fi
    # NODE_RANK set: no ssh; run this script once on every node, each with its own NODE_RANK.
    if [ -n "${NODE_RANK:-}" ]; then LAUNCH+=(--no_ssh --node_rank "$NODE_RANK"); fi ;;
  *) echo "launch.sh: unknown deployment '$DEPLOYMENT' (cpu, single_gpu, single_node, multi_node)" >&2; exit 2 ;;
esac
INIT=()
if [ -n "${INIT_FROM:-}" ]; then INIT=(--trainer.init_from "$INIT_FROM"); fi
# A stop that stops every rank: SIGTERM/SIGINT to this script (a scheduler, `kill <pid>`, Ctrl-C) is
# passed to the deepspeed launcher, which runs in its own process group; every rank sees its
# launcher end, stops at the next step boundary (saving a checkpoint there unless
# --trainer.save_on_signal false) and exits; this script returns only once every rank is gone.
set -m
"${LAUNCH[@]}" "$STEP_MAIN" "${INIT[@]}" "$@" &
LAUNCHER=$!
STOPPED=0
stop() { STOPPED=$1; kill -s "$2" "$LAUNCHER" 2>/dev/null || true; }
trap 'stop 143 TERM' TERM
trap 'stop 130 INT' INT
set +e
while true; do
  wait "$LAUNCHER"; STATUS=$?
  kill -0 "$LAUNCHER" 2>/dev/null || break  # wait returned for a trapped signal: the launcher still runs
done
while kill -0 -- "-$LAUNCHER" 2>/dev/null; do sleep 1; done  # the ranks, finishing their step
if [ "$STOPPED" != 0 ]; then exit "$STOPPED"; fi
exit "$STATUS"
