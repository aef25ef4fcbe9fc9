#!/usr/bin/env bash
# One node's part of a multi-node training job, without ssh: launch/slurm.sbatch runs it once per node
# (srun --ntasks-per-node=1). It starts this node's ranks of launch/train.py with the deepspeed launcher
# (--no_ssh --node_rank) or torchrun, and stands between the scheduler's stop signals and the ranks.
#
#   srun --ntasks-per-node=1 bash launch/slurm_node.sh --config CONFIG [train.py args]
#
# Environment, set by launch/slurm.sbatch (any of them can be set by hand):
#   MASTER_ADDR, MASTER_PORT  node 0's address and the rendezvous port (the same on every node)
#   MMOE_LAUNCHER             deepspeed (default) | torchrun
#   MMOE_PROCS_PER_NODE       ranks on this node; default: the node's GPUs (SLURM_GPUS_ON_NODE, then
#                             SLURM_GPUS_PER_NODE), 1 on a node without GPUs
#   MMOE_RUN_DIRS             the run folder(s) (launch/run_dirs.py); resolved here when unset
#   MMOE_NODE_RANK, MMOE_NNODES  default SLURM_NODEID and the step's node count
#   MMOE_DRAIN_S              how long to wait for the ranks after the launcher ended (default 60)
#
# Signals. SLURM delivers a job's signals (scancel --signal=USR1, #SBATCH --signal=USR1@120, the SIGTERM of
# scancel and of the time limit) to every process of the step, launchers included, and this script may get one
# alone (kill, scancel --full). Every rank stops on SIGUSR1 and SIGTERM at the next optimizer step, after a
# complete checkpoint, and exits 75 (train/preemption.py). The launchers in between would get in the way:
#   - deepspeed's runner (bin/deepspeed, with --no_ssh) installs no handler: SIGTERM or SIGUSR1 kills it at once,
#     and it exits 0 when its child (the per-node launcher) was killed by a signal;
#   - deepspeed's per-node launcher (deepspeed.launcher.launch) dies on SIGUSR1; on SIGTERM it sends SIGTERM
#     to every process below it, SIGKILL 30 s later, and exits 1;
#   - torchrun dies on SIGUSR1; on SIGTERM it sends SIGTERM to its workers, SIGKILL 30 s later, and exits 1;
#     it turns a worker's exit code 75 into 1.
# So the launcher starts with SIGUSR1 and SIGTERM ignored (an ignored signal stays ignored across exec; each
# launcher still installs its own SIGTERM handler, which execs of the ranks reset to the default, and every
# rank installs its own handlers for its stop signals). This script traps both signals and sends the one it
# got to each rank (the first process below the launchers; not the DataLoader workers), also to ranks that
# start after the signal, then waits for the launcher and for every process it started.
#
# Exit code: 75 when the run was preempted (rank 0 wrote a new <run>/preempted.json during this step: every
# rank stopped after a complete checkpoint) whatever the launcher returned; otherwise the launcher's code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"  # train.py's relative paths (configs, out_dir) are the repository's, as when run by hand
# shellcheck disable=SC1091
source scripts/env.sh  # this node's virtualenv (built on first use; MMOE_VENV may point to a shared one)
set -euo pipefail      # env.sh leaves these off for interactive shells

NODE_RANK=${MMOE_NODE_RANK:-${SLURM_NODEID:?not a SLURM task: set MMOE_NODE_RANK}}
NNODES=${MMOE_NNODES:-${SLURM_STEP_NUM_NODES:-${SLURM_JOB_NUM_NODES:?not a SLURM task: set MMOE_NNODES}}}
LAUNCHER=${MMOE_LAUNCHER:-deepspeed}
: "${MASTER_ADDR:?set by launch/slurm.sbatch}" "${MASTER_PORT:?set by launch/slurm.sbatch}"
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}  # --gpus-per-node=a100:8 gives "a100:8"
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
PROCS=${MMOE_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
TAG="[slurm_node $NODE_RANK/$NNODES]"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Which run folders to look in for preempted.json, and what they held before this step: a record left by an
# earlier attempt that failed before its trainer cleared it must not read as a preemption of this one.
if [ -z "${MMOE_RUN_DIRS:-}" ]; then
    MMOE_RUN_DIRS=$(python launch/run_dirs.py "$@")
fi
mapfile -t RUN_DIRS <<< "$MMOE_RUN_DIRS"
for i in "${!RUN_DIRS[@]}"; do
    if [ -f "${RUN_DIRS[$i]}/preempted.json" ]; then cp "${RUN_DIRS[$i]}/preempted.json" "$TMP/before-$i"; fi
done

case "$LAUNCHER" in
    deepspeed)
        # --no_ssh: this node's ranks only. The hostfile gives every node's slot count in node-rank order; with
        # --no_ssh its names are only labels, so node0..nodeN-1 serve (no name lookup, no scontrol needed).
        for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$PROCS"; done > "$TMP/hostfile"
        cmd=(deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$TMP/hostfile"
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py "$@") ;;
    torchrun)
        # c10d rendezvous at node 0's address: the agents agree on node ranks themselves (so rank 0 may run on any
        # node); the job id names the rendezvous, so a re-queued job's agents find each other and nobody else's.
        cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$PROCS" --node-rank "$NODE_RANK" --rdzv-backend c10d
             --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "mmoe-${SLURM_JOB_ID:-local}" launch/train.py "$@") ;;
    *) echo "$TAG error: MMOE_LAUNCHER=$LAUNCHER: expected deepspeed or torchrun" >&2; exit 2 ;;
esac

# Every process the launcher starts inherits this variable: it finds them, orphans included, without a name.
MARK="$$-$(date +%s%N)"

alive() {  # a live process (a zombie is not)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s%% *}" != Z ]
}

parent_of() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    s=${s#* }
    echo "${s%% *}"
}

is_launcher() {  # by the first words of its command line: deepspeed's runner or per-node launcher, torchrun
    local -a argv=()
    mapfile -d "" -t argv 2>/dev/null < "/proc/$1/cmdline" || return 1
    local a
    for a in "${argv[@]:0:4}"; do
        case "$a" in
            deepspeed | */deepspeed | torchrun | */torchrun | deepspeed.launcher.launch | torch.distributed.run) return 0 ;;
        esac
    done
    return 1
}

task_pids() {  # every live process the launcher started, at any depth
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        if [ "$p" != "$$" ] && grep -qzx "MMOE_NODE_TASK=$MARK" "/proc/$p/environ" 2>/dev/null; then echo "$p"; fi
    done
}

rank_pids() {  # the ranks: not a launcher, and started by one (or orphaned); their DataLoader workers are not
    local -A ours=()
    local p pp
    for p in $(task_pids); do ours[$p]=1; done
    for p in "${!ours[@]}"; do
        is_launcher "$p" && continue
        pp=$(parent_of "$p") || continue
        if [ -z "${ours[$pp]:-}" ] || is_launcher "$pp"; then echo "$p"; fi
    done
}

STOP=""
declare -A TOLD=()
tell_ranks() {  # send the stop signal to every rank not told yet
    local p
    for p in $(rank_pids); do
        if [ -z "${TOLD[$p]:-}" ] && kill -s "$STOP" "$p" 2>/dev/null; then
            TOLD[$p]=1
            echo "$TAG SIG$STOP -> rank process $p" >&2
        fi
    done
}
on_signal() {
    if [ -z "$STOP" ]; then echo "$TAG got SIG$1: the ranks stop at the next optimizer step with a checkpoint" >&2; fi
    STOP=$1
    tell_ranks
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

echo "$TAG $LAUNCHER, $PROCS process(es) on $(hostname), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
(
    trap '' USR1 TERM  # ignored, not handled: stays so in the launcher after exec (see the header)
    export MMOE_NODE_TASK=$MARK
    exec "${cmd[@]}"
) &
LAUNCHER_PID=$!

# Wait in one-second slices: a trapped signal is handled at once, and ranks that start after a signal are told.
while alive "$LAUNCHER_PID"; do
    sleep 1 &
    wait $! || true
    if [ -n "$STOP" ]; then tell_ranks; fi
done
rc=0
wait "$LAUNCHER_PID" || rc=$?

# A launcher can end before its ranks (killed, or deepspeed's runner whose child died): wait for every process
# it started, so that SLURM does not end the step (and kill them) in the middle of a checkpoint.
deadline=$(( $(date +%s) + ${MMOE_DRAIN_S:-60} ))
left=$(task_pids)
while [ -n "$left" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 0.5
    left=$(task_pids)
done
if [ -n "$left" ]; then echo "$TAG still running after the launcher ended: $(echo "$left" | tr '\n' ' ')" >&2; fi

for i in "${!RUN_DIRS[@]}"; do
    record="${RUN_DIRS[$i]}/preempted.json"
    if [ -f "$record" ] && ! cmp -s "$record" "$TMP/before-$i" 2>/dev/null; then
        echo "$TAG preempted (launcher exit code $rc): $(tr -d '\n' < "$record")" >&2
        exit 75
    fi
done
echo "$TAG $LAUNCHER exited with $rc" >&2
exit "$rc"
