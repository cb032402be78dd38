/* prefetchclient: clients for the connection prefetching tests.
 *
 *   prefetchclient time HOST PORT N [GAP_MS]
 *                                     N blocking connects, GAP_MS apart (default 100), each
 *                                     followed by an HTTP GET /id read to the end; prints
 *                                     "<connect µs> <µs to the last byte> <body>" per connect
 *   prefetchclient opts HOST PORT     sets socket options, O_NONBLOCK and FD_CLOEXEC, connects
 *                                     (non-blocking: EINPROGRESS, poll, SO_ERROR), then prints
 *                                     "name=value" for each as the connected socket has it, and
 *                                     the result of a GET /id on it
 *
 * Exit status: 0 on success, 2 on a connect error, 3 on anything else. Bounded: alarm(60). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static struct sockaddr_in addr(const char *host, int port) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(3);
    }
    return sin;
}

/* GET /id on a connected socket (blocking or not); the body, or "ERR". */
static void get_id(int fd, char *out, size_t cap) {
    const char req[] = "GET /id HTTP/1.0\r\nHost: web\r\n\r\n";
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    char buf[4096];
    size_t got = 0;
    snprintf(out, cap, "ERR");
    if (write(fd, req, sizeof req - 1) != (ssize_t)(sizeof req - 1)) return;
    for (;;) {
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0) break;
        got += (size_t)n;
        if (got == sizeof buf - 1) break;
    }
    buf[got] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    if (!body) return;
    body += 4;
    body[strcspn(body, "\r\n")] = 0;
    snprintf(out, cap, "%s", body);
}

static int mode_time(const char *host, int port, int n, int gap_ms) {
    struct sockaddr_in sin = addr(host, port);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        long long t0 = now_us();
        int rc = connect(fd, (struct sockaddr *)&sin, sizeof sin);
        long long took = now_us() - t0;
        if (rc != 0) {
            printf("ERR %s\n", strerror(errno));
            return 2;
        }
        char body[256];
        get_id(fd, body, sizeof body);
        long long total = now_us() - t0;
        printf("%lld %lld %s\n", took, total, body);
        fflush(stdout);
        close(fd);
        usleep((useconds_t)gap_ms * 1000);
    }
    return 0;
}

static int geti(int fd, int level, int name) {
    int v = -1;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, name, &v, &len) != 0) return -1;
    return v;
}

static void seti(int fd, int level, int name, int v, const char *what) {
    if (setsockopt(fd, level, name, &v, sizeof v) != 0) {
        fprintf(stderr, "setsockopt %s: %s\n", what, strerror(errno));
        exit(3);
    }
}

static int mode_opts(const char *host, int port) {
    struct sockaddr_in sin = addr(host, port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    seti(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
    seti(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
    seti(fd, SOL_SOCKET, SO_RCVBUF, 65536, "SO_RCVBUF");
    seti(fd, SOL_SOCKET, SO_SNDBUF, 32768, "SO_SNDBUF");
    struct linger lg = {1, 7};
    if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) != 0) return 3;
    seti(fd, IPPROTO_IP, IP_TOS, 0x10, "IP_TOS");
    seti(fd, SOL_SOCKET, SO_PRIORITY, 3, "SO_PRIORITY");
    seti(fd, SOL_SOCKET, SO_MARK, 42, "SO_MARK");
    seti(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, 12345, "TCP_USER_TIMEOUT");
    seti(fd, IPPROTO_TCP, TCP_KEEPIDLE, 33, "TCP_KEEPIDLE");
    seti(fd, IPPROTO_TCP, TCP_KEEPINTVL, 7, "TCP_KEEPINTVL");
    seti(fd, IPPROTO_TCP, TCP_KEEPCNT, 4, "TCP_KEEPCNT");
    long long t0 = now_us();
    int rc = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    int err = rc == 0 ? 0 : errno;
    long long took = now_us() - t0;
    if (rc != 0 && err != EINPROGRESS) {
        printf("ERR %s\n", strerror(err));
        return 2;
    }
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    poll(&p, 1, 10000);
    int soerr = geti(fd, SOL_SOCKET, SO_ERROR);
    printf("connect=%s\n", rc == 0 ? "0" : "EINPROGRESS");
    printf("connect_us=%lld\n", took);
    printf("so_error=%d\n", soerr);
    printf("nonblock=%d\n", (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
    printf("cloexec=%d\n", (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
    printf("SO_KEEPALIVE=%d\n", geti(fd, SOL_SOCKET, SO_KEEPALIVE));
    printf("TCP_NODELAY=%d\n", geti(fd, IPPROTO_TCP, TCP_NODELAY));
    printf("SO_RCVBUF=%d\n", geti(fd, SOL_SOCKET, SO_RCVBUF));
    printf("SO_SNDBUF=%d\n", geti(fd, SOL_SOCKET, SO_SNDBUF));
    socklen_t len = sizeof lg;
    memset(&lg, 0, sizeof lg);
    getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len);
    printf("SO_LINGER=%d,%d\n", lg.l_onoff, lg.l_linger);
    printf("IP_TOS=%d\n", geti(fd, IPPROTO_IP, IP_TOS));
    printf("SO_PRIORITY=%d\n", geti(fd, SOL_SOCKET, SO_PRIORITY));
    printf("SO_MARK=%d\n", geti(fd, SOL_SOCKET, SO_MARK));
    printf("TCP_USER_TIMEOUT=%d\n", geti(fd, IPPROTO_TCP, TCP_USER_TIMEOUT));
    printf("TCP_KEEPIDLE=%d\n", geti(fd, IPPROTO_TCP, TCP_KEEPIDLE));
    printf("TCP_KEEPINTVL=%d\n", geti(fd, IPPROTO_TCP, TCP_KEEPINTVL));
    printf("TCP_KEEPCNT=%d\n", geti(fd, IPPROTO_TCP, TCP_KEEPCNT));
    /* A repeated connect() after a finished one: EISCONN, as the kernel says. */
    rc = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    printf("again=%s\n", rc == 0 ? "0" : errno == EISCONN ? "EISCONN" : strerror(errno));
    char body[256];
    get_id(fd, body, sizeof body);
    printf("id=%s\n", body);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: prefetchclient time|opts HOST PORT [N]\n");
        return 3;
    }
    alarm(60);
    const char *mode = argv[1], *host = argv[2];
    int port = atoi(argv[3]);
    if (!strcmp(mode, "time"))
        return mode_time(host, port, argc > 4 ? atoi(argv[4]) : 10, argc > 5 ? atoi(argv[5]) : 100);
    if (!strcmp(mode, "opts")) return mode_opts(host, port);
    fprintf(stderr, "unknown mode %s\n", mode);
    return 3;
}
