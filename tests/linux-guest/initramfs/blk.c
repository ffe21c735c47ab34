/*
 * blk: disk I/O through Linux's own drivers, in the units and with the pattern and checksum
 * the host side of the tests computes (tests/e2e/common/disk.rs): sectors of 512 bytes, the
 * splitmix64 stream of a seed as little-endian words, FNV-1a 64 folded over whole words.
 * Every transfer uses O_DIRECT, so it reaches the device instead of the page cache.
 *
 *   blk fill DEV FIRST COUNT SEED   write COUNT sectors of SEED's pattern from sector FIRST,
 *                                   then fsync: "blk fill fnv 0x..."
 *   blk sum DEV FIRST COUNT         read them back: "blk sum fnv 0x..."
 *   blk stream DEV SLOTS NOW        write 64 KiB per round, round R (from 1) with seed R into
 *                                   slot R % SLOTS, printing "stream R" after each and keeping
 *                                   the latest line in the file NOW, until SIGTERM; then fsync
 *                                   and print "stream done R" (NOW: "done R").
 */
#define _GNU_SOURCE /* O_DIRECT */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SECTOR 512
#define STREAM_SECTORS 128

static volatile sig_atomic_t stop;

static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill_pattern(unsigned char *buf, size_t len, uint64_t seed) {
    uint64_t state = seed;
    for (size_t at = 0; at < len; at += 8) {
        uint64_t word = splitmix64(&state);
        for (int i = 0; i < 8; i++)
            buf[at + i] = (unsigned char)(word >> (8 * i));
    }
}

static uint64_t fnv(const unsigned char *buf, size_t len, uint64_t hash) {
    for (size_t at = 0; at + 8 <= len; at += 8) {
        uint64_t word = 0;
        for (int i = 0; i < 8; i++)
            word |= (uint64_t)buf[at + i] << (8 * i);
        hash = (hash ^ word) * 0x100000001b3ULL;
    }
    return hash;
}

static unsigned char *aligned(size_t len) {
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, len)) {
        fprintf(stderr, "blk: out of memory\n");
        exit(1);
    }
    return buf;
}

static int open_disk(const char *path, int flags) {
    int fd = open(path, flags | O_DIRECT);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    return fd;
}

static void transfer(int fd, unsigned char *buf, size_t len, off_t at, int write) {
    ssize_t done = write ? pwrite(fd, buf, len, at) : pread(fd, buf, len, at);
    if (done != (ssize_t)len) {
        if (done < 0)
            perror(write ? "blk: write" : "blk: read");
        else
            fprintf(stderr, "blk: short transfer at %lld: %zd of %zu\n", (long long)at, done, len);
        exit(1);
    }
}

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "";
    if ((!strcmp(cmd, "fill") && argc == 6) || (!strcmp(cmd, "sum") && argc == 5)) {
        int write = !strcmp(cmd, "fill");
        off_t first = atoll(argv[3]);
        size_t len = (size_t)atoll(argv[4]) * SECTOR;
        unsigned char *buf = aligned(len);
        int fd = open_disk(argv[2], write ? O_WRONLY : O_RDONLY);
        if (write) {
            fill_pattern(buf, len, strtoull(argv[5], NULL, 0));
            transfer(fd, buf, len, first * SECTOR, 1);
            if (fsync(fd)) {
                perror("blk: fsync");
                return 1;
            }
        } else {
            transfer(fd, buf, len, first * SECTOR, 0);
        }
        printf("blk %s fnv 0x%016llx\n", cmd,
               (unsigned long long)fnv(buf, len, 0xcbf29ce484222325ULL));
        return 0;
    }
    if (!strcmp(cmd, "stream") && argc == 5) {
        long slots = atol(argv[3]), round = 0;
        size_t len = STREAM_SECTORS * SECTOR;
        unsigned char *buf = aligned(len);
        int fd = open_disk(argv[2], O_WRONLY);
        int now_fd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (slots <= 0 || now_fd < 0) {
            fprintf(stderr, "blk stream: bad slots or %s\n", argv[4]);
            return 2;
        }
        setvbuf(stdout, NULL, _IOLBF, 0);
        /* A round in progress completes: the log and the disk agree on the last one. */
        struct sigaction term = {.sa_handler = on_term};
        sigaction(SIGTERM, &term, NULL);
        while (!stop) {
            round++;
            fill_pattern(buf, len, (uint64_t)round);
            transfer(fd, buf, len, (off_t)(round % slots) * (off_t)len, 1);
            char line[64];
            int n = snprintf(line, sizeof(line), "stream %ld\n", round);
            fputs(line, stdout);
            /* Rounds only grow, so each line covers the one before. */
            if (pwrite(now_fd, line, n, 0) != n) {
                perror(argv[4]);
                return 1;
            }
        }
        if (fsync(fd)) {
            perror("blk: fsync");
            return 1;
        }
        printf("stream done %ld\n", round);
        char line[64];
        int n = snprintf(line, sizeof(line), "done %ld\n", round);
        if (pwrite(now_fd, line, n, 0) != n) {
            perror(argv[4]);
            return 1;
        }
        return 0;
    }
    fprintf(stderr, "usage: blk fill DEV FIRST COUNT SEED | sum DEV FIRST COUNT | "
                    "stream DEV SLOTS NOW\n");
    return 2;
}
