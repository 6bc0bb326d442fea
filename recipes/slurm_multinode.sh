#!/bin/bash
#SBATCH --job-name=mochi-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=3-00:00:00
#SBATCH --output=%x-%j.out
#
# Multi-node pre-training on SLURM: one `accelerate launch` per node (one srun task per node),
# each starting GPUS_PER_NODE DDP workers; the nodes meet through torch's c10d rendezvous at the
# first node of the allocation. Submit from the repository root, with the environment that has
# mochi_hub and accelerate installed already activated (srun passes it on to every node):
#
#   sbatch recipes/slurm_multinode.sh recipes/in1k_vit_small_mocov3_mochi.yaml [key=value ...]
#   sbatch --nodes=4 recipes/slurm_multinode.sh recipes/in1k_vit_base_mocov3_mochi.yaml
#
# The number of nodes comes from the allocation (--nodes), the GPUs per node from GPUS_PER_NODE
# (default 8; keep it equal to --gres). Optional environment: MAIN_PORT (default 29500),
# ACCELERATE_CONFIG (default recipes/accelerate/multi_node.yaml; the flags below override its
# process counts, rank and address), ACCELERATE (the accelerate executable). Re-submitting the
# same recipe resumes from the newest complete checkpoint of its run directory (train.resume auto).
# Adapt the #SBATCH lines (partition, account, time, CPUs) to the cluster.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
recipe=$1
shift

: "${SLURM_JOB_NODELIST:?run this script through sbatch (or inside an salloc allocation)}"
cd "${SLURM_SUBMIT_DIR:-.}"

export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MAIN_PORT=${MAIN_PORT:-29500}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate/multi_node.yaml}
export ACCELERATE=${ACCELERATE:-accelerate}
export NUM_NODES=${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}
export NUM_PROCESSES=$((NUM_NODES * GPUS_PER_NODE))

# The rendezvous host: the first node of the allocation, by its address as that node sees it.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_NODE_IP=$(srun --nodes=1 --ntasks=1 --nodelist="$head_node" hostname --ip-address | awk '{print $1}')
export HEAD_NODE_IP

# Data-loader workers do the image decoding; keep intra-op threads per process modest.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "job $SLURM_JOB_ID: $NUM_NODES node(s) x $GPUS_PER_NODE GPU(s) = $NUM_PROCESSES processes," \
     "rendezvous at $head_node ($HEAD_NODE_IP:$MAIN_PORT); recipe $recipe $*"

# Single quotes: SLURM_NODEID must be expanded by each node's task, not here. The recipe and its
# overrides reach the inner shell as positional arguments ("$@"), so they are never re-split.
srun --nodes="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$ACCELERATE" launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NUM_NODES" \
        --num_processes "$NUM_PROCESSES" \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$HEAD_NODE_IP" \
        --main_process_port "$MAIN_PORT" \
        --rdzv_backend c10d \
        -m mochi_hub pretrain "$@"
' mochi-launch "$recipe" "$@"
