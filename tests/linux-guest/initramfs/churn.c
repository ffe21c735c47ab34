/*
 * churn MIB PERIOD_MS [NOW_FILE]: rewrites MIB MiB of memory in rounds and prints "churn R SUM"
 * after round R (from 1), then sleeps PERIOD_MS; NOW_FILE, rewritten in place with the same
 * line, lets the shell's `read` built-in fetch the latest round without starting a process. Round R turns each 64-bit word w[i] into
 * w[i] * 6364136223846793005 + (R << 32 | i) (wrapping; all words start at 0); SUM folds the
 * words in order as s = (s ^ w[i]) * 1099511628211 from s = 14695981039346656037. Every word
 * depends on every round before, so memory lost or mixed up across a snapshot shows in every
 * later SUM; the tests compute the same sums on the host.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long mib = argc > 2 ? atol(argv[1]) : 0, period_ms = argc > 2 ? atol(argv[2]) : -1;
    if (mib <= 0 || period_ms < 0) {
        fprintf(stderr, "usage: churn MIB PERIOD_MS\n");
        return 2;
    }
    size_t words = (size_t)mib << 17;
    uint64_t *w = calloc(words, sizeof(*w));
    if (!w) {
        fprintf(stderr, "churn: cannot allocate %ld MiB\n", mib);
        return 1;
    }
    int now_fd = argc > 3 ? open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644) : -1;
    if (argc > 3 && now_fd < 0) {
        perror(argv[3]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec pause = {period_ms / 1000, (period_ms % 1000) * 1000000L};
    for (uint64_t round = 1;; round++) {
        uint64_t sum = 14695981039346656037ULL;
        for (size_t i = 0; i < words; i++) {
            w[i] = w[i] * 6364136223846793005ULL + (round << 32 | i);
            sum = (sum ^ w[i]) * 1099511628211ULL;
        }
        char line[64];
        int len = snprintf(line, sizeof(line), "churn %llu %016llx\n", (unsigned long long)round,
                           (unsigned long long)sum);
        fputs(line, stdout);
        /* Rounds only grow and sums have a fixed width, so each line covers the one before. */
        if (now_fd >= 0 && pwrite(now_fd, line, len, 0) != len) {
            perror(argv[3]);
            return 1;
        }
        nanosleep(&pause, NULL);
    }
}
