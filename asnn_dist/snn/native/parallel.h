/* Run n independent jobs on the OpenMP threads of the process (shared by both kernels).
 *
 * Why OpenMP and not our own threads: torch's CPU build runs its intra-op work on libgomp, and
 * native.py links this library against the libgomp that torch has already loaded (same
 * soname), so these jobs reuse torch's thread pool: no thread creation per call, and no
 * contention with torch's worker threads, which spin for a while after every torch op.
 * Jobs are split into fixed ranges before the call and their partial sums combined by the
 * caller in job order, so results do not depend on how many threads the runtime grants.
 */
#ifndef ASNN_PARALLEL_H
#define ASNN_PARALLEL_H

#include <stddef.h>

static inline void run_jobs(int n, size_t size, char *jobs, void (*fn)(void *)) {
    if (n <= 1) {
        if (n == 1) fn(jobs);
        return;
    }
#pragma omp parallel for schedule(static, 1) num_threads(n)
    for (int k = 0; k < n; ++k) fn(jobs + (size_t)k * size);
}

#endif
