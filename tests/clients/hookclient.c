/* hookclient: small TCP/UDP clients for the connect hook's black-box tests. Each mode connects
 * to HOST:PORT one particular way and prints one line: "OK <greeting>" with what the backend
 * said, or "ERR <errno-name>" with the connect's errno, so a test can see which backend answered
 * and compare errno with an unhooked run.
 *
 *   hookclient block     HOST PORT     blocking AF_INET connect
 *   hookclient nonblock  HOST PORT     non-blocking connect, connect again, poll, SO_ERROR
 *   hookclient v6mapped  HOST PORT     AF_INET6 socket to ::ffff:HOST
 *   hookclient udp       HOST PORT     UDP connect: prints the peer the kernel holds
 *   hookclient forkthreads HOST PORT N 4 threads doing N connects each while main forks 8 children
 *   hookclient signal    HOST PORT N   N connects in main while SIGALRM handlers connect too
 *   hookclient many      HOST PORT N   N blocking connects, prints each greeting (one per line)
 *   hookclient slowmany  HOST PORT N   the same with 50 ms between connects
 *
 * Exit status: 0 on success, 2 on a connect error, 3 on anything else. Bounded: alarm(30).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EINPROGRESS: return "EINPROGRESS";
    case EALREADY: return "EALREADY";
    case EISCONN: return "EISCONN";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case ENOTSOCK: return "ENOTSOCK";
    case EACCES: return "EACCES";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EINTR: return "EINTR";
    case 0: return "0";
    default: return "EOTHER";
    }
}

static struct sockaddr_in v4addr(const char *host, int port) {
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

/* Reads one line (the backend's name) with a 5 s bound; async-signal-safe. */
static int read_greeting(int fd, char *buf, size_t cap) {
    size_t got = 0;
    while (got + 1 < cap) {
        struct pollfd p = {fd, POLLIN, 0};
        int pr = poll(&p, 1, 5000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) break;
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
        if (memchr(buf, '\n', got)) break;
    }
    buf[got] = 0;
    char *nl = strchr(buf, '\n');
    if (nl) *nl = 0;
    return got > 0 ? 0 : -1;
}

static void linger0(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

/* One blocking connect + greeting. Returns 0 or the errno. */
static int one(const struct sockaddr *sa, socklen_t len, int family, char *buf, size_t cap) {
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno;
    int rc = connect(fd, sa, len);
    if (rc < 0 && errno == EINTR) {
        /* The connect goes on in the background: wait for it, as POSIX says, rather than
         * calling connect again (which would say EALREADY). */
        struct pollfd p = {fd, POLLOUT, 0};
        int pr;
        do pr = poll(&p, 1, 5000); while (pr < 0 && errno == EINTR);
        int soerr = pr == 1 ? 0 : ETIMEDOUT;
        socklen_t sl = sizeof soerr;
        if (pr == 1) getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        rc = soerr ? -1 : 0;
        errno = soerr;
    }
    if (rc < 0) {
        int e = errno;
        close(fd);
        return e;
    }
    int r = read_greeting(fd, buf, cap);
    linger0(fd);
    close(fd);
    return r == 0 ? 0 : EIO;
}

static int report(int e, const char *greeting) {
    if (e == 0) {
        printf("OK %s\n", greeting);
        return 0;
    }
    printf("ERR %s\n", errname(e));
    return 2;
}

static int mode_block(const char *host, int port) {
    struct sockaddr_in sin = v4addr(host, port);
    char buf[256];
    errno = 0;
    int e = one((struct sockaddr *)&sin, sizeof sin, AF_INET, buf, sizeof buf);
    return report(e, buf);
}

static int mode_many(const char *host, int port, int n, int pause_ms) {
    struct sockaddr_in sin = v4addr(host, port);
    int fails = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && pause_ms > 0) usleep((useconds_t)pause_ms * 1000);
        char buf[256];
        int e = one((struct sockaddr *)&sin, sizeof sin, AF_INET, buf, sizeof buf);
        if (report(e, buf)) fails++;
    }
    return fails ? 2 : 0;
}

static int mode_nonblock(const char *host, int port) {
    struct sockaddr_in sin = v4addr(host, port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return 3;
    int rc1 = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    int e1 = rc1 < 0 ? errno : 0;
    if (rc1 < 0 && e1 != EINPROGRESS) {
        printf("ERR %s\n", errname(e1));
        return 2;
    }
    /* A second connect while the first is under way: EALREADY (or EISCONN if it already
     * finished); with the hook it must reach the same backend, never a new one. */
    int rc2 = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    int e2 = rc2 < 0 ? errno : 0;
    struct pollfd p = {fd, POLLOUT, 0};
    if (poll(&p, 1, 5000) != 1) {
        printf("ERR poll-timeout\n");
        return 2;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    if (soerr) {
        printf("ERR %s\n", errname(soerr));
        return 2;
    }
    int rc3 = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    int e3 = rc3 < 0 ? errno : 0;
    int flags = fcntl(fd, F_GETFL);
    char buf[256];
    if (read_greeting(fd, buf, sizeof buf) != 0) {
        printf("ERR no-greeting\n");
        return 3;
    }
    printf("OK %s first=%s second=%s third=%s nonblock=%d\n", buf, errname(e1), errname(e2), errname(e3),
           (flags & O_NONBLOCK) != 0);
    linger0(fd);
    close(fd);
    return 0;
}

static int mode_v6mapped(const char *host, int port) {
    struct sockaddr_in6 sin6;
    memset(&sin6, 0, sizeof sin6);
    sin6.sin6_family = AF_INET6;
    sin6.sin6_port = htons((unsigned short)port);
    char mapped[64];
    snprintf(mapped, sizeof mapped, "::ffff:%s", host);
    if (inet_pton(AF_INET6, mapped, &sin6.sin6_addr) != 1) return 3;
    char buf[256];
    int e = one((struct sockaddr *)&sin6, sizeof sin6, AF_INET6, buf, sizeof buf);
    return report(e, buf);
}

static int mode_udp(const char *host, int port) {
    struct sockaddr_in sin = v4addr(host, port);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0) {
        printf("ERR %s\n", errname(errno));
        return 2;
    }
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    getpeername(fd, (struct sockaddr *)&peer, &pl);
    char ip[64];
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
    printf("OK peer=%s:%d\n", ip, ntohs(peer.sin_port));
    close(fd);
    return 0;
}

struct job {
    struct sockaddr_in sin;
    int n;
    int ok;
};

static void *worker(void *arg) {
    struct job *j = arg;
    for (int i = 0; i < j->n; i++) {
        char buf[256];
        if (one((struct sockaddr *)&j->sin, sizeof j->sin, AF_INET, buf, sizeof buf) == 0) j->ok++;
    }
    return NULL;
}

static int mode_forkthreads(const char *host, int port, int n) {
    struct job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i].sin = v4addr(host, port);
        jobs[i].n = n;
        jobs[i].ok = 0;
        pthread_create(&th[i], NULL, worker, &jobs[i]);
    }
    int children_ok = 0, children = 8;
    for (int c = 0; c < children; c++) {
        usleep(2000);
        pid_t pid = fork();
        if (pid == 0) {
            /* The child: only this thread survives; the hook must still work here. */
            char buf[256];
            struct sockaddr_in sin = v4addr(host, port);
            int e = one((struct sockaddr *)&sin, sizeof sin, AF_INET, buf, sizeof buf);
            _exit(e == 0 ? 0 : 1);
        }
        int st = 0;
        if (pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0) children_ok++;
    }
    int threads_ok = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        threads_ok += jobs[i].ok;
    }
    printf("%s threads=%d/%d children=%d/%d\n", (threads_ok == 4 * n && children_ok == children) ? "OK" : "ERR",
           threads_ok, 4 * n, children_ok, children);
    return (threads_ok == 4 * n && children_ok == children) ? 0 : 2;
}

static struct sockaddr_in sig_sin;
static volatile sig_atomic_t sig_ok, sig_fail;

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    char buf[64];
    int e = one((struct sockaddr *)&sig_sin, sizeof sig_sin, AF_INET, buf, sizeof buf);
    if (e == 0) sig_ok++;
    else sig_fail++;
    errno = saved;
}

static int mode_signal(const char *host, int port, int n) {
    sig_sin = v4addr(host, port);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &it, NULL);
    /* At least n connects, and on until a handler has connected too (connects can be faster
     * than the timer), bounded by 100 n connects. */
    int ok = 0, done = 0;
    while (done < n || (sig_ok + sig_fail == 0 && done < 100 * n)) {
        char buf[256];
        if (one((struct sockaddr *)&sig_sin, sizeof sig_sin, AF_INET, buf, sizeof buf) == 0) ok++;
        done++;
    }
    n = done;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("%s main=%d/%d handler=%d failed=%d\n", (ok == n && sig_ok > 0 && sig_fail == 0) ? "OK" : "ERR", ok, n,
           (int)sig_ok, (int)sig_fail);
    return (ok == n && sig_ok > 0 && sig_fail == 0) ? 0 : 2;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: hookclient MODE HOST PORT [N]\n");
        return 3;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argv[1], *host = argv[2];
    int port = atoi(argv[3]);
    int n = argc > 4 ? atoi(argv[4]) : 20;
    if (strcmp(mode, "signal") != 0) alarm(30);
    if (!strcmp(mode, "block")) return mode_block(host, port);
    if (!strcmp(mode, "many")) return mode_many(host, port, n, 0);
    if (!strcmp(mode, "slowmany")) return mode_many(host, port, n, 50);
    if (!strcmp(mode, "nonblock")) return mode_nonblock(host, port);
    if (!strcmp(mode, "v6mapped")) return mode_v6mapped(host, port);
    if (!strcmp(mode, "udp")) return mode_udp(host, port);
    if (!strcmp(mode, "forkthreads")) return mode_forkthreads(host, port, n);
    if (!strcmp(mode, "signal")) return mode_signal(host, port, n);
    fprintf(stderr, "unknown mode %s\n", mode);
    return 3;
}
