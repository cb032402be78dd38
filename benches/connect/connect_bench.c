/* connect_bench: latency of socket()+connect()+close() cycles against a loopback server.
 * SO_LINGER {1,0} on close sends RST, so no TIME_WAIT piles up. Prints percentiles in
 * microseconds of the whole cycle:
 *
 *   connect_bench HOST PORT [WARMUP=2000] [ITERS=50000]
 *   -> "p50_us=10.2 p90_us=12.0 p99_us=20.1 mean_us=10.9 n=50000 fails=0"
 *
 * HOST:PORT may be a magic address (run under LD_PRELOAD with the hook) or the backend itself.
 * The backend is `connect_bench --serve ADDR PORT`: accept and close, forever (bounded by alarm).
 * `connect_bench --udp HOST PORT ...` times UDP socket+connect+close instead: no packet is sent,
 * so the cycle is short and steady enough to resolve the hook's passthrough cost.
 * `connect_bench --nonblock HOST PORT ...` connects as most runtimes do: a non-blocking socket, connect()
 * (EINPROGRESS), poll for POLLOUT, getsockopt(SO_ERROR); the hook then also reports the connect under way.
 * `connect_bench --passthrough HOST PORT N` calls connect(-1, HOST:PORT) N times (EBADF at once) and
 * prints the mean in nanoseconds: the cost of the call itself, which under the hook includes its
 * address check. Run it with and without LD_PRELOAD on a non-magic address.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static struct sockaddr_in addr(const char *host, int port) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", host);
        exit(3);
    }
    return sin;
}

static int serve(const char *host, int port) {
    alarm(3600);
    struct sockaddr_in sin = addr(host, port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, 4096) < 0) {
        perror("bind/listen");
        return 2;
    }
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) close(c);
    }
}

static int sock_type = SOCK_STREAM;
static int nonblock = 0;

static int cycle(const struct sockaddr_in *sin) {
    int fd = socket(AF_INET, sock_type | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    int rc = connect(fd, (const struct sockaddr *)sin, sizeof *sin);
    if (nonblock && rc < 0 && errno == EINPROGRESS) {
        struct pollfd p = {fd, POLLOUT, 0};
        int err = 0;
        socklen_t len = sizeof err;
        rc = (poll(&p, 1, 5000) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) ? 0 : -1;
    }
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
    return rc;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "--serve")) return serve(argv[2], atoi(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "--passthrough")) {
        struct sockaddr_in sin = addr(argv[2], atoi(argv[3]));
        long n = atol(argv[4]);
        for (long i = 0; i < n / 10; i++) connect(-1, (struct sockaddr *)&sin, sizeof sin);
        double t0 = now_us();
        for (long i = 0; i < n; i++) connect(-1, (struct sockaddr *)&sin, sizeof sin);
        printf("mean_ns=%.1f n=%ld\n", (now_us() - t0) * 1000.0 / n, n);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "--nonblock")) {
        nonblock = 1;
        argv++;
        argc--;
    }
    if (argc >= 2 && !strcmp(argv[1], "--udp")) {
        sock_type = SOCK_DGRAM;
        argv++;
        argc--;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: connect_bench HOST PORT [WARMUP] [ITERS] | --serve ADDR PORT\n");
        return 3;
    }
    alarm(600);
    struct sockaddr_in sin = addr(argv[1], atoi(argv[2]));
    int warmup = argc > 3 ? atoi(argv[3]) : 2000;
    int iters = argc > 4 ? atoi(argv[4]) : 50000;
    double *t = calloc((size_t)iters, sizeof *t);
    int fails = 0;
    for (int i = 0; i < warmup; i++) fails += cycle(&sin) != 0;
    if (fails == warmup && warmup > 0) {
        fprintf(stderr, "every warm-up connect failed: %s\n", strerror(errno));
        return 2;
    }
    fails = 0;
    double sum = 0;
    for (int i = 0; i < iters; i++) {
        double t0 = now_us();
        fails += cycle(&sin) != 0;
        t[i] = now_us() - t0;
        sum += t[i];
    }
    qsort(t, (size_t)iters, sizeof *t, cmp);
    printf("p50_us=%.2f p90_us=%.2f p99_us=%.2f mean_us=%.2f n=%d fails=%d\n", t[iters / 2], t[iters * 9 / 10],
           t[iters * 99 / 100], sum / iters, iters, fails);
    return fails ? 2 : 0;
}
