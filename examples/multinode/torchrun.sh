#!/usr/bin/env bash
# Multi-node megaphi with torchrun's elastic agent: run this same script on every node; the nodes meet at
# MASTER_ADDR:MASTER_PORT (c10d rendezvous, hosted by the node whose address MASTER_ADDR is) and a
# failed worker or node restarts the whole job, which resumes from the last checkpoint in --save/--load
# (up to MAX_RESTARTS times; a node that comes back joins the next round).
#
#   # on each of the 2 nodes (same command; the training flags are megaphi.pretrain's):
#   MASTER_ADDR=node1 NNODES=2 NPROC_PER_NODE=8 IFNAME=eth0 bash examples/multinode/torchrun.sh \
#       --model phi-1 ... --save /shared/ckpt --load /shared/ckpt --save-interval-minutes 30
#
# Environment (defaults):
#   MASTER_ADDR      (required) host name or address of the node that hosts the rendezvous store
#   MASTER_PORT      29400      rendezvous port on MASTER_ADDR
#   NNODES           2          nodes; "MIN:MAX" (e.g. 1:2) lets the job go on with fewer nodes
#   NPROC_PER_NODE   8          ranks per node (one per GPU)
#   MAX_RESTARTS     3          restarts of the whole job after a failure (torchrun --max-restarts)
#   RUN_ID           megaphi    rendezvous id: the same on every node, different per job
#   IFNAME           (unset)    network interface for gloo and NCCL: exported as GLOO_SOCKET_IFNAME and
#                               NCCL_SOCKET_IFNAME (set it when a node has several networks)
#   LOCAL_ADDR       (unset)    this node's address as the other nodes reach it (torchrun --local-addr);
#                               needed only where the host name does not resolve to that address
#   RDZV_IS_HOST     (unset)    true on the MASTER_ADDR node, false elsewhere: needed only where torchrun
#                               cannot tell from the host name which node hosts the store
#   TORCHRUN_ARGS    (unset)    more torchrun flags, e.g. "--log-dir logs --redirects 3"
# Always exported: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. Without it torchrun hands the workers its own
# long-lived TCP store and a restarted round can read the dead round's addresses ("failed to connect",
# then RendezvousClosedError): every restart then fails (docs/training.md, Multi-node).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous node (host name or address)}"
MASTER_PORT=${MASTER_PORT:-29400}
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RUN_ID=${RUN_ID:-megaphi}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # megaphi from this checkout; paths stay the caller's

export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
if [[ -n "${IFNAME:-}" ]]; then
    export GLOO_SOCKET_IFNAME="$IFNAME" NCCL_SOCKET_IFNAME="$IFNAME"
fi
LAUNCHER=(torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
          --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RUN_ID"
          --max-restarts "$MAX_RESTARTS")
[[ -n "${LOCAL_ADDR:-}" ]] && LAUNCHER+=(--local-addr "$LOCAL_ADDR")
[[ -n "${RDZV_IS_HOST:-}" ]] && LAUNCHER+=(--rdzv-conf "is_host=$RDZV_IS_HOST")
# shellcheck disable=SC2206
[[ -n "${TORCHRUN_ARGS:-}" ]] && LAUNCHER+=($TORCHRUN_ARGS)
exec "${LAUNCHER[@]}" -m megaphi.pretrain "$@"
