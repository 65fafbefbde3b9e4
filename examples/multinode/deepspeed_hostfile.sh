#!/usr/bin/env bash
# Multi-node megaphi with the DeepSpeed launcher. Two routes:
#
#   # 1. from one node, over ssh (pdsh): the launcher starts every node listed in HOSTFILE
#   HOSTFILE=hostfile bash examples/multinode/deepspeed_hostfile.sh --model phi-1 ... --save /shared/ckpt
#
#   # 2. no ssh: run the same command on every node, each with its NODE_RANK (0 on MASTER_ADDR)
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=node1 bash examples/multinode/deepspeed_hostfile.sh ...
#   HOSTFILE=hostfile NODE_RANK=1 MASTER_ADDR=node1 bash examples/multinode/deepspeed_hostfile.sh ...
#
# HOSTFILE lists one node per line, "NAME slots=GPUS" (DeepSpeed's format), the same file on every node:
#     node1 slots=8
#     node2 slots=8
# Environment (defaults):
#   HOSTFILE      (required) the hostfile above
#   NODE_RANK     (unset)    set: route 2 (deepspeed --no_ssh --node_rank NODE_RANK)
#   MASTER_ADDR   first host of HOSTFILE   address of node rank 0, as the other nodes reach it
#   MASTER_PORT   29500
#   IFNAME        (unset)    network interface for gloo and NCCL: exported as GLOO_SOCKET_IFNAME and
#                            NCCL_SOCKET_IFNAME (route 1: the other nodes get only what ~/.deepspeed_env
#                            lists, one VAR=value a line: put GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME there)
# The DeepSpeed launcher does not restart a failed job: rerun the command (it resumes from --load), or use
# examples/multinode/torchrun.sh (elastic) or examples/slurm/pretrain_phi1.sbatch (--requeue).
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines \"NAME slots=GPUS\")}"
[[ -f "$HOSTFILE" ]] || { echo "deepspeed_hostfile.sh: HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
NNODES=$(grep -cE '^[^#[:space:]]' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$(awk '/^[^#[:space:]]/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # megaphi from this checkout; paths stay the caller's

if [[ -n "${IFNAME:-}" ]]; then
    export GLOO_SOCKET_IFNAME="$IFNAME" NCCL_SOCKET_IFNAME="$IFNAME"
fi
LAUNCHER=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR"
          --master_port "$MASTER_PORT")
if [[ -n "${NODE_RANK:-}" ]]; then
    LAUNCHER+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "${LAUNCHER[@]}" --module megaphi.pretrain "$@"
