/* torture: many hooked connects at once, from threads, forked children, exec'd children and signal
 * handlers, each checked against what an unhooked program sees. For tests/chaos/hook-torture.sh.
 *
 *   torture probe IP:PORT     (run WITHOUT the hook) prints "IP:PORT=BLOCK/NB": the errno a blocking
 *                             connect gets, and the outcome of a non-blocking one (its errno if it fails
 *                             at once, else "EINPROGRESS+" and SO_ERROR after poll), e.g.
 *                             127.0.0.9:7001=ECONNREFUSED/EINPROGRESS+ECONNREFUSED
 *   torture run               (under the hook) the torture, configured by the environment below
 *   torture child N           what `run` execs: N connects of the mix below, exit 0 if all were as expected
 *
 * Environment:
 *   T_OK      "IP:PORT=PREFIX ..." magic addresses whose connects must succeed with a greeting starting
 *             with PREFIX (tests/clients/greeter.c)
 *   T_FAIL    "IP:PORT=BLOCK/NB ..." addresses whose connects must fail exactly as the probe said
 *             (magic addresses of services whose backends refuse or are unreachable, an unassigned magic
 *             address, a refusing non-magic address)
 *   T_TOTAL=1000000 connects in all, T_THREADS=16, T_FORK_MS=20 (the main thread forks a child this
 *   often), T_CHILD_N=20 (connects per child), T_WORKER_FORK=5000 (each worker forks a child every this
 *   many connects), T_SIG_US=1000 (SIGALRM interval; the handler connects), T_STALL_S=20 (no progress for
 *   this long is a hang)
 *
 * The mix, by connect number i % 16: 0-8 blocking to T_OK; 9-10 non-blocking to T_OK (EINPROGRESS, a
 * second connect says EALREADY or EISCONN, SO_ERROR 0, O_NONBLOCK kept, greeting); 11 an AF_INET6 socket
 * to the v4-mapped T_OK address; 12 blocking to T_FAIL; 13 non-blocking to T_FAIL; 14 UDP connect to a
 * T_OK address (must be left alone: the kernel's peer is the magic address); 15 blocking to T_OK again.
 * Forked children run the same mix without threads; half of them exec `torture child` first.
 *
 * Last line on stdout:
 *   connects=N ok=N mismatches=N signal_ok=N signal_fail=N forks=N execs=N child_fail=N crashes=N
 *   hangs=N max_connect_ms=N
 * Each new kind of mismatch is printed to stderr at once ("MISMATCH what target got= want="), and at the
 * end every kind with its count, per process ("MISMATCHES pid= count= ..."). Exit 0 when everything
 * matched, 2 if not.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXT 32

struct ok_target {
    struct sockaddr_in sin;
    struct sockaddr_in6 mapped;
    char prefix[32];
    char text[64];
};
struct fail_target {
    struct sockaddr_in sin;
    char block[24], nb[48];
    char text[64];
};

static struct ok_target oks[MAXT];
static struct fail_target fails[MAXT];
static int n_ok, n_fail;

static atomic_llong total_connects, total_ok, mismatches, sig_ok, sig_fail, max_ns;
static atomic_llong forks, execs, child_fail, crashes, hangs;
static const char *self_path = "/proc/self/exe";

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static const char *errname(int e) {
    switch (e) {
    case 0: return "0";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EINPROGRESS: return "EINPROGRESS";
    case EALREADY: return "EALREADY";
    case EISCONN: return "EISCONN";
    case EINVAL: return "EINVAL";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EINTR: return "EINTR";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EMFILE: return "EMFILE";
    case EIO: return "EIO(no-greeting)";
    default: return "EOTHER";
    }
}

static void note_max(long long ns) {
    long long m = atomic_load(&max_ns);
    while (ns > m && !atomic_compare_exchange_weak(&max_ns, &m, ns)) {
    }
}

/* Mismatches, counted by kind (what, target, got, want): each new kind is printed to stderr at
 * once, and every kind with its count by summary(). Async-signal-safe (a slot is claimed with a
 * compare-and-swap; a kind whose slot is still being filled may take a second one). */
#define KINDS 32
static struct {
    atomic_int state; /* 0 free, 1 being filled, 2 ready */
    char key[200];
    atomic_llong count;
} kinds[KINDS];

static void mismatch(const char *what, const char *target, const char *got, const char *want) {
    atomic_fetch_add(&mismatches, 1);
    char key[200];
    size_t n = 0;
    const char *parts[] = {what, " ", target, " got=", got, " want=", want};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        size_t l = strlen(parts[i]);
        if (n + l >= sizeof key) l = sizeof key - n - 1;
        memcpy(key + n, parts[i], l);
        n += l;
    }
    key[n] = 0;
    for (int i = 0; i < KINDS; i++) {
        int st = atomic_load(&kinds[i].state);
        if (st == 2 && strcmp(kinds[i].key, key) == 0) {
            atomic_fetch_add(&kinds[i].count, 1);
            return;
        }
        int zero = 0;
        if (st == 0 && atomic_compare_exchange_strong(&kinds[i].state, &zero, 1)) {
            memcpy(kinds[i].key, key, n + 1);
            atomic_store(&kinds[i].count, 1);
            atomic_store(&kinds[i].state, 2);
            char line[240];
            memcpy(line, "MISMATCH ", 9);
            memcpy(line + 9, key, n);
            line[9 + n] = '\n';
            ssize_t w = write(2, line, 10 + n);
            (void)w;
            return;
        }
    }
}

/* Every kind of mismatch with its count (pid: this process's share). */
static void summary(void) {
    for (int i = 0; i < KINDS; i++) {
        if (atomic_load(&kinds[i].state) != 2) continue;
        char line[300];
        int n = snprintf(line, sizeof line, "MISMATCHES pid=%d count=%lld %s\n", (int)getpid(),
                         atomic_load(&kinds[i].count), kinds[i].key);
        ssize_t w = write(2, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
        (void)w;
    }
}

/* Reads a greeting line within 2 s; async-signal-safe. 0 and the line in buf, or -1. */
static int greeting(int fd, char *buf, size_t cap) {
    size_t got = 0;
    while (got + 1 < cap) {
        struct pollfd p = {fd, POLLIN, 0};
        int pr = poll(&p, 1, 2000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) break;
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) break;
        got += (size_t)n;
        if (memchr(buf, '\n', got)) break;
    }
    buf[got] = 0;
    char *nl = memchr(buf, '\n', got);
    if (!nl) return -1;
    *nl = 0;
    return 0;
}

static void close_rst(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

/* Waits for a connect under way; its outcome (0 or SO_ERROR); ETIMEDOUT after 5 s. */
static int settle(int fd) {
    struct pollfd p = {fd, POLLOUT, 0};
    int pr;
    do pr = poll(&p, 1, 5000);
    while (pr < 0 && errno == EINTR);
    if (pr != 1) return ETIMEDOUT;
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
    return soerr;
}

/* A blocking connect's errno (an EINTR is waited out, as POSIX says the connect goes on). */
static int blocking_connect(int fd, const struct sockaddr *sa, socklen_t len) {
    long long t0 = now_ns();
    int rc = connect(fd, sa, len);
    int e = rc < 0 ? errno : 0;
    if (e == EINTR) e = settle(fd);
    note_max(now_ns() - t0);
    return e;
}

/* The non-blocking outcome: the errno of connect if it fails at once, else SO_ERROR after poll.
 * With `second`, connect is called again while the first is under way (its errno in *second);
 * without, not (a second connect on a refused socket would consume the error). *pending says
 * whether the first connect returned EINPROGRESS. */
static int nonblocking_outcome(int fd, const struct sockaddr *sa, socklen_t len, int *second, int *pending) {
    long long t0 = now_ns();
    int rc = connect(fd, sa, len);
    int e = rc < 0 ? errno : 0;
    note_max(now_ns() - t0);
    if (second) *second = -1;
    *pending = e == EINPROGRESS || e == EINTR;
    if (*pending) {
        if (second) {
            int rc2 = connect(fd, sa, len);
            *second = rc2 < 0 ? errno : 0;
        }
        e = settle(fd);
    }
    return e;
}

/* "ECONNREFUSED" for a connect that failed at once, "EINPROGRESS+ECONNREFUSED" for one that failed
 * later (async-signal-safe). */
static const char *nb_text(int pending, int e, char *buf, size_t cap) {
    const char *name = errname(e);
    size_t n = 0;
    if (pending) {
        memcpy(buf, "EINPROGRESS+", 12);
        n = 12;
    }
    size_t l = strlen(name);
    if (n + l + 1 > cap) l = cap - n - 1;
    memcpy(buf + n, name, l);
    buf[n + l] = 0;
    return buf;
}

static int ok_blocking(const struct ok_target *t, int v6) {
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return mismatch("socket", t->text, errname(errno), "fd"), -1;
    int e = v6 ? blocking_connect(fd, (const struct sockaddr *)&t->mapped, sizeof t->mapped)
               : blocking_connect(fd, (const struct sockaddr *)&t->sin, sizeof t->sin);
    char buf[64];
    if (e) {
        mismatch(v6 ? "v6mapped" : "block", t->text, errname(e), "0");
        close(fd);
        return -1;
    }
    if (greeting(fd, buf, sizeof buf) != 0 || strncmp(buf, t->prefix, strlen(t->prefix)) != 0) {
        mismatch(v6 ? "v6mapped-greeting" : "greeting", t->text, buf, t->prefix);
        close_rst(fd);
        return -1;
    }
    close_rst(fd);
    return 0;
}

static int ok_nonblocking(const struct ok_target *t) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return mismatch("socket", t->text, errname(errno), "fd"), -1;
    int second, pending;
    int e = nonblocking_outcome(fd, (const struct sockaddr *)&t->sin, sizeof t->sin, &second, &pending);
    int bad = 0;
    if (e) bad = (mismatch("nonblock", t->text, errname(e), "0"), 1);
    else if (second != -1 && second != EALREADY && second != EISCONN && second != 0)
        bad = (mismatch("nonblock-second", t->text, errname(second), "EALREADY|EISCONN"), 1);
    else if (!(fcntl(fd, F_GETFL) & O_NONBLOCK))
        bad = (mismatch("nonblock-flags", t->text, "blocking", "O_NONBLOCK"), 1);
    char buf[64] = "";
    if (!bad && (greeting(fd, buf, sizeof buf) != 0 || strncmp(buf, t->prefix, strlen(t->prefix)) != 0))
        bad = (mismatch("nonblock-greeting", t->text, buf, t->prefix), 1);
    close_rst(fd);
    return bad ? -1 : 0;
}

static int fail_blocking(const struct fail_target *t) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return mismatch("socket", t->text, errname(errno), "fd"), -1;
    int e = blocking_connect(fd, (const struct sockaddr *)&t->sin, sizeof t->sin);
    close(fd);
    if (strcmp(errname(e), t->block) != 0) return mismatch("fail-block", t->text, errname(e), t->block), -1;
    return 0;
}

static int fail_nonblocking(const struct fail_target *t) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return mismatch("socket", t->text, errname(errno), "fd"), -1;
    int pending;
    int e = nonblocking_outcome(fd, (const struct sockaddr *)&t->sin, sizeof t->sin, NULL, &pending);
    close(fd);
    char got[48];
    if (strcmp(nb_text(pending, e, got, sizeof got), t->nb) != 0) return mismatch("fail-nonblock", t->text, got, t->nb), -1;
    return 0;
}

static int udp_passthrough(const struct ok_target *t) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return mismatch("socket", t->text, errname(errno), "fd"), -1;
    int rc = connect(fd, (const struct sockaddr *)&t->sin, sizeof t->sin);
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    int bad = rc < 0 || getpeername(fd, (struct sockaddr *)&peer, &pl) < 0 ||
              peer.sin_addr.s_addr != t->sin.sin_addr.s_addr || peer.sin_port != t->sin.sin_port;
    close(fd);
    if (bad) return mismatch("udp", t->text, "rewritten-or-failed", "left-alone"), -1;
    return 0;
}

/* Connect number i of the mix; 0 if it went as expected. */
static int one(unsigned i) {
    const struct ok_target *o = &oks[(i / 16) % (unsigned)n_ok];
    const struct fail_target *f = &fails[(i / 16) % (unsigned)n_fail];
    int r;
    switch (i % 16) {
    case 9: case 10: r = ok_nonblocking(o); break;
    case 11: r = ok_blocking(o, 1); break;
    case 12: r = fail_blocking(f); break;
    case 13: r = fail_nonblocking(f); break;
    case 14: r = udp_passthrough(o); break;
    default: r = ok_blocking(o, 0); break;
    }
    atomic_fetch_add(&total_connects, 1);
    if (r == 0) atomic_fetch_add(&total_ok, 1);
    return r;
}

static atomic_uint sig_turn;
static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    unsigned k = atomic_fetch_add(&sig_turn, 1);
    if (ok_blocking(&oks[k % (unsigned)n_ok], 0) == 0) atomic_fetch_add(&sig_ok, 1);
    else atomic_fetch_add(&sig_fail, 1);
    errno = saved;
}

static void arm_signals(long us) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    if (us > 0) {
        struct itimerval it = {{0, us}, {0, us}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
}

static void disarm_signals(void) {
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
}

/* Waits at most 20 s for a child; counts a crash (killed by a signal), a hang, or a failure. */
static void reap(pid_t pid) {
    long long deadline = now_ns() + 20000000000LL;
    for (;;) {
        int st = 0;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (WIFSIGNALED(st)) {
                atomic_fetch_add(&crashes, 1);
                char msg[64];
                int n = snprintf(msg, sizeof msg, "CRASH child %d signal %d\n", (int)pid, WTERMSIG(st));
                ssize_t w = write(2, msg, (size_t)n);
                (void)w;
            } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                atomic_fetch_add(&child_fail, 1);
            }
            return;
        }
        if (r < 0 && errno != EINTR) return;
        if (now_ns() > deadline) {
            atomic_fetch_add(&hangs, 1);
            ssize_t w = write(2, "HANG child\n", 11);
            (void)w;
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

/* In a fresh fork child (only the forking thread exists): n connects of the mix, then _exit. */
static void child_connects(int n, unsigned seed) {
    long long before = atomic_load(&mismatches);
    for (int i = 0; i < KINDS; i++) atomic_store(&kinds[i].state, 0); /* the parent's kinds are not ours */
    for (int i = 0; i < n; i++) one(seed + (unsigned)i);
    summary();
    _exit(atomic_load(&mismatches) == before ? 0 : 2);
}

static int fork_child(int n, unsigned seed, int do_exec) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        disarm_signals();
        if (do_exec) {
            char num[16];
            snprintf(num, sizeof num, "%d", n);
            char *args[] = {"torture", "child", num, NULL};
            execv(self_path, args);
            _exit(3);
        }
        child_connects(n, seed);
    }
    atomic_fetch_add(&forks, 1);
    if (do_exec) atomic_fetch_add(&execs, 1);
    reap(pid);
    return 0;
}

struct worker {
    pthread_t th;
    long n;
    unsigned seed;
    long worker_fork;
    atomic_long done;
};

static void *work(void *arg) {
    struct worker *w = arg;
    for (long i = 0; i < w->n; i++) {
        one(w->seed + (unsigned)i);
        atomic_store(&w->done, i + 1);
        if (w->worker_fork > 0 && (i + 1) % w->worker_fork == 0) fork_child(5, w->seed + (unsigned)i, 0);
    }
    return NULL;
}

static long env_long(const char *name, long def) {
    const char *v = getenv(name);
    return v && *v ? atol(v) : def;
}

static int parse_targets(void) {
    char buf[4096];
    const char *ok = getenv("T_OK"), *fail = getenv("T_FAIL");
    if (!ok || !fail) return -1;
    snprintf(buf, sizeof buf, "%s", ok);
    for (char *save, *tok = strtok_r(buf, " ", &save); tok && n_ok < MAXT; tok = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(tok, '='), *colon = strrchr(tok, ':');
        if (!eq || !colon || colon > eq) return -1;
        struct ok_target *t = &oks[n_ok];
        snprintf(t->text, sizeof t->text, "%.*s", (int)(eq - tok), tok);
        snprintf(t->prefix, sizeof t->prefix, "%s", eq + 1);
        *colon = 0;
        memset(&t->sin, 0, sizeof t->sin);
        t->sin.sin_family = AF_INET;
        t->sin.sin_port = htons((unsigned short)atoi(colon + 1));
        if (inet_pton(AF_INET, tok, &t->sin.sin_addr) != 1) return -1;
        char mapped[64];
        snprintf(mapped, sizeof mapped, "::ffff:%s", tok);
        memset(&t->mapped, 0, sizeof t->mapped);
        t->mapped.sin6_family = AF_INET6;
        t->mapped.sin6_port = t->sin.sin_port;
        if (inet_pton(AF_INET6, mapped, &t->mapped.sin6_addr) != 1) return -1;
        n_ok++;
    }
    snprintf(buf, sizeof buf, "%s", fail);
    for (char *save, *tok = strtok_r(buf, " ", &save); tok && n_fail < MAXT; tok = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(tok, '='), *colon = strrchr(tok, ':');
        char *slash = eq ? strchr(eq, '/') : NULL;
        if (!eq || !colon || colon > eq || !slash) return -1;
        struct fail_target *t = &fails[n_fail];
        snprintf(t->text, sizeof t->text, "%.*s", (int)(eq - tok), tok);
        snprintf(t->block, sizeof t->block, "%.*s", (int)(slash - eq - 1), eq + 1);
        snprintf(t->nb, sizeof t->nb, "%s", slash + 1);
        *colon = 0;
        memset(&t->sin, 0, sizeof t->sin);
        t->sin.sin_family = AF_INET;
        t->sin.sin_port = htons((unsigned short)atoi(colon + 1));
        if (inet_pton(AF_INET, tok, &t->sin.sin_addr) != 1) return -1;
        n_fail++;
    }
    return n_ok > 0 && n_fail > 0 ? 0 : -1;
}

static int probe(const char *spec) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", spec);
    char *colon = strrchr(buf, ':');
    if (!colon) return 3;
    *colon = 0;
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, buf, &sin.sin_addr) != 1) return 3;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int b = blocking_connect(fd, (struct sockaddr *)&sin, sizeof sin);
    close(fd);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int pending;
    int nb = nonblocking_outcome(fd, (struct sockaddr *)&sin, sizeof sin, NULL, &pending);
    close(fd);
    char text[48];
    printf("%s=%s/%s\n", spec, errname(b), nb_text(pending, nb, text, sizeof text));
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "probe")) return probe(argv[2]);
    if (parse_targets() != 0) {
        fprintf(stderr, "usage: torture probe IP:PORT | run | child N, with T_OK and T_FAIL set (see the top of torture.c)\n");
        return 3;
    }
    long sig_us = env_long("T_SIG_US", 1000);
    if (argc >= 3 && !strcmp(argv[1], "child")) {
        arm_signals(sig_us); /* the parent kills a child that takes more than 20 s */
        long long before = atomic_load(&mismatches);
        for (int i = 0; i < atoi(argv[2]); i++) one((unsigned)getpid() + (unsigned)i);
        disarm_signals();
        summary();
        return atomic_load(&mismatches) == before && atomic_load(&sig_fail) == 0 ? 0 : 2;
    }
    if (argc < 2 || strcmp(argv[1], "run") != 0) return 3;

    long total = env_long("T_TOTAL", 1000000), threads = env_long("T_THREADS", 16);
    long fork_ms = env_long("T_FORK_MS", 20), child_n = env_long("T_CHILD_N", 20);
    long worker_fork = env_long("T_WORKER_FORK", 5000), stall_s = env_long("T_STALL_S", 20);
    if (threads < 1 || threads > 256) return 3;
    static struct worker ws[256];
    arm_signals(sig_us);
    for (long t = 0; t < threads; t++) {
        ws[t].n = total / threads + (t < total % threads ? 1 : 0);
        ws[t].seed = (unsigned)(t * 7919);
        ws[t].worker_fork = worker_fork;
        atomic_store(&ws[t].done, 0);
        if (pthread_create(&ws[t].th, NULL, work, &ws[t]) != 0) return 3;
    }
    /* The main thread forks children while the workers connect, and watches for a stall. */
    long long last_progress = now_ns(), last_total = -1;
    unsigned k = 0;
    for (;;) {
        long done = 0, want = 0;
        for (long t = 0; t < threads; t++) {
            done += atomic_load(&ws[t].done);
            want += ws[t].n;
        }
        if (done >= want) break;
        if (done != last_total) {
            last_total = done;
            last_progress = now_ns();
        } else if (now_ns() - last_progress > stall_s * 1000000000LL) {
            atomic_fetch_add(&hangs, 1);
            fprintf(stderr, "HANG: no connect finished for %ld s (%ld of %ld done)\n", stall_s, done, want);
            break;
        }
        struct timespec ts = {fork_ms / 1000, (fork_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        if (fork_ms > 0) fork_child((int)child_n, k * 104729u, (int)(k % 2));
        k++;
    }
    if (atomic_load(&hangs) == 0)
        for (long t = 0; t < threads; t++) pthread_join(ws[t].th, NULL);
    disarm_signals();
    summary();
    int good = atomic_load(&mismatches) == 0 && atomic_load(&sig_fail) == 0 && atomic_load(&child_fail) == 0 &&
               atomic_load(&crashes) == 0 && atomic_load(&hangs) == 0;
    printf("connects=%lld ok=%lld mismatches=%lld signal_ok=%lld signal_fail=%lld forks=%lld execs=%lld "
           "child_fail=%lld crashes=%lld hangs=%lld max_connect_ms=%lld\n",
           atomic_load(&total_connects), atomic_load(&total_ok), atomic_load(&mismatches), atomic_load(&sig_ok),
           atomic_load(&sig_fail), atomic_load(&forks), atomic_load(&execs), atomic_load(&child_fail),
           atomic_load(&crashes), atomic_load(&hangs), atomic_load(&max_ns) / 1000000);
    fflush(stdout);
    if (atomic_load(&hangs)) _exit(2);
    return good ? 0 : 2;
}
