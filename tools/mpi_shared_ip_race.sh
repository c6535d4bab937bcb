#!/usr/bin/env bash
# The rehearsal cluster's one known flaw, shown without this suite: a plain C MPI program
# (MPI_Init, allgather, allreduce) launched N times as 16 ranks over node[1-4] under srun. Every
# node there has the same IP address; Open MPI 4.1's TCP start-up then fails now and then
# (a peer's connect() reported as failed, then segfaults). Needs the cluster up and mpicc.
#
#   bash tools/mpi_shared_ip_race.sh [N]      # prints each failure, then "ok=.. failed=.."
set -euo pipefail
n=${1:-50}
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
