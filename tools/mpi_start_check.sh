#!/usr/bin/env bash
# Open MPI's start-up across the rehearsal's nodes, shown without this suite: a plain C MPI
# program (MPI_Init_thread asking for MPI_THREAD_MULTIPLE as Horovod does, allgather, allreduce)
# launched N times (default 30) as 16 ranks over node[1-4] under srun --mpi=pmix. Prints each
# failed launch, then "ok=.. failed=.." (exit 1 if any failed). Needs the cluster up and mpicc.
#
#   bash tools/mpi_start_check.sh [N]
#
# What it catches: a rank dying of SIGSEGV inside MPI_Init, still waiting in its first PMIx
# fence (the modex), when a peer that has already left MPI_Init sends it a message: Open MPI
# 4.1.4's TCP transport calls that message's handler, which is not registered yet (a null
# pointer); its peers then report "Open MPI failed to TCP connect to a peer MPI process". It was
# blamed on the nodes sharing one address, but with an address per node it failed as often. The
# fence algorithm of Slurm 22.05's PMIx plugin decides it (December 2026, PMIx 4.2.2, loaded
# cores): Slurm's default ("mixed": ring for the fence with data, tree for the barrier) failed 4
# of 30 and 11 of 40 launches, tree only 11 of 30, ring only 0 of 30. So tools/slurm_local.sh
# sets PMIxCollFence=ring in the nodes' mpi.conf; SLURM_PMIX_FENCE=mixed in the environment
# brings the default back. Under the same load, mixed with OMPI_MCA_mpi_add_procs_cutoff=100000
# failed 7 of 40, with OMPI_MCA_btl_tcp_disable_family=6 9 of 40, with
# SLURM_PMIX_FENCE_BARRIER=true 3 of 40.
set -euo pipefail
n=${1:-30}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/t.c" <<'C'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
  int provided, rank, size, mine[1024], all[16 * 1024];
  double x, sum;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int i = 0; i < 1024; i++) mine[i] = rank;
  for (int k = 0; k < 5 && size <= 16; k++)
    MPI_Allgather(mine, 1024, MPI_INT, all, 1024, MPI_INT, MPI_COMM_WORLD);
  x = rank;
  MPI_Allreduce(&x, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) printf("ok %g\n", sum);
  MPI_Finalize();
  return 0;
}
C
mpicc -O1 -o "$dir/t" "$dir/t.c"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
ok=0 failed=0
for i in $(seq "$n"); do
  if out=$(timeout 120 srun -N4 --ntasks-per-node=4 --mpi=pmix "$dir/t" 2>&1) && grep -q '^ok 120$' <<<"$out"; then
    ok=$((ok + 1))
  else
    failed=$((failed + 1))
    printf '=== launch %d failed\n%s\n' "$i" "$(tail -20 <<<"$out")"
  fi
done
echo "ok=$ok failed=$failed"
((failed == 0))
