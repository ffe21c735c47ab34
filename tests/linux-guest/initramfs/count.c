/*
 * count PERIOD_MS [NOW_FILE]: prints "count N MS" every PERIOD_MS milliseconds of
 * CLOCK_MONOTONIC, N from 1 and MS the monotonic time in milliseconds. Deadlines are absolute,
 * so a late wake-up does not shift the ones after it; but after a jump of more than a period
 * (a guest restored long after its snapshot sees the time it spent suspended) the next deadline
 * is one period from now, instead of a burst of lines for every period missed. NOW_FILE, rewritten in place with the same line, lets the shell's `read` built-in fetch the
 * latest line without starting a process.
 */
#include <fcntl.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long period_ms = argc > 1 ? atol(argv[1]) : 0;
    if (period_ms <= 0) {
        fprintf(stderr, "usage: count PERIOD_MS\n");
        return 2;
    }
    int now_fd = argc > 2 ? open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644) : -1;
    if (argc > 2 && now_fd < 0) {
        perror(argv[2]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (unsigned long n = 1;; n++) {
        next.tv_nsec += period_ms * 1000000L;
        next.tv_sec += next.tv_nsec / 1000000000L;
        next.tv_nsec %= 1000000000L;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL))
            ;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long late_ns = (now.tv_sec - next.tv_sec) * 1000000000LL + now.tv_nsec - next.tv_nsec;
        if (late_ns > period_ms * 1000000LL)
            next = now;
        char line[64];
        int len = snprintf(line, sizeof(line), "count %lu %lld\n", n,
                           (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000);
        fputs(line, stdout);
        /* N and MS only grow, so each line covers the one before. */
        if (now_fd >= 0 && pwrite(now_fd, line, len, 0) != len) {
            perror(argv[2]);
            return 1;
        }
    }
}
