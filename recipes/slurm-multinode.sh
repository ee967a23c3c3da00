#!/usr/bin/env bash
# Multi-node training on Slurm: one task per node, each running `accelerate launch` for its 8 GPUs.
#
#   sbatch --nodes 2 recipes/slurm-multinode.sh recipes/viomni-2b-full.yaml
#
# Every node runs the same recipe; ranks, the rendezvous address and the number of processes come from Slurm.
# In-batch negatives are gathered across all nodes' GPUs (loss.gather_across_devices in the recipe).
#SBATCH --job-name=viomni
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch --nodes N recipes/slurm-multinode.sh RECIPE.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

mkdir -p logs
# srun starts one launcher per node; SLURM_NODEID is that node's machine rank. A re-queued job (or a second
# sbatch with the same recipe) resumes from the last checkpoint in the recipe's output_dir.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file recipes/accelerate/16gpu-2nodes.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_PROCESS_IP \
    --main_process_port $MAIN_PROCESS_PORT \
    -m st_viomni.cli train $RECIPE"
