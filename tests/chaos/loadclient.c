/* loadclient: paced TCP connects for the chaos scripts, meant to run under the discotech hook.
 *
 *   loadclient RATE SECONDS STOPFILE EXEC_EVERY TARGET...
 *
 * TARGET is IP:PORT=PREFIX: a connect to IP:PORT (a magic address) must succeed and the backend's
 * greeting (tests/clients/greeter.c writes its name) must start with PREFIX, i.e. come from a
 * backend of that service. Targets are taken in turn, RATE connects a second (paced on absolute
 * deadlines; a client that falls behind catches up without sleeping, at most 1 s worth), until
 * SECONDS pass or STOPFILE exists (checked every 50 connects).
 *
 * EXEC_EVERY > 0: after that many connects the process exec()s itself, carrying its counts in
 * the environment, so every EXEC_EVERY connects a fresh process loads the hook and maps the routing
 * table again (possibly while the daemon is down). 0: one process for the whole run.
 *
 * Every failure is printed to stderr as "FAIL <unix ms> <target> <errno name or what>" (the first
 * 200), so a script can line failures up with what it did. The last line on stdout:
 *   ok=N failed=N wrong=N execs=N max_connect_us=N behind_s=N achieved_rate=N
 * failed: connect error or no greeting within 2 s; wrong: a greeting from another service.
 * Exit status 0 when failed = wrong = 0, else 2; 3 on bad usage.
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

#define MAX_TARGETS 64

struct target {
    struct sockaddr_in sin;
    char prefix[64];
    char text[160];
};

static long long now_ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static const char *errname(int e) {
    switch (e) {
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EINTR: return "EINTR";
    case EMFILE: return "EMFILE";
    default: return "EOTHER";
    }
}

static int parse_target(const char *s, struct target *t) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    char *eq = strchr(buf, '=');
    char *colon = strrchr(buf, ':');
    if (!eq || !colon || colon > eq) return -1;
    *eq = 0;
    *colon = 0;
    memset(&t->sin, 0, sizeof t->sin);
    t->sin.sin_family = AF_INET;
    t->sin.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, buf, &t->sin.sin_addr) != 1) return -1;
    snprintf(t->prefix, sizeof t->prefix, "%s", eq + 1);
    snprintf(t->text, sizeof t->text, "%s:%s", buf, colon + 1);
    return 0;
}

/* One connect and greeting. 0 ok, 1 wrong service, -errno (or -EIO: no greeting) on failure. */
static int one(const struct target *t, long long *connect_ns) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    long long t0 = now_ns(CLOCK_MONOTONIC);
    int rc = connect(fd, (const struct sockaddr *)&t->sin, sizeof t->sin);
    int e = rc < 0 ? errno : 0;
    *connect_ns = now_ns(CLOCK_MONOTONIC) - t0;
    if (rc < 0) {
        close(fd);
        return -e;
    }
    char buf[128];
    size_t got = 0;
    while (got + 1 < sizeof buf && !memchr(buf, '\n', got)) {
        struct pollfd p = {fd, POLLIN, 0};
        int pr = poll(&p, 1, 2000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) break;
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    buf[got] = 0;
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
    if (!memchr(buf, '\n', got)) return -EIO;
    return strncmp(buf, t->prefix, strlen(t->prefix)) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: loadclient RATE SECONDS STOPFILE EXEC_EVERY IP:PORT=PREFIX...\n");
        return 3;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    long rate = atol(argv[1]);
    long seconds = atol(argv[2]);
    const char *stopfile = argv[3];
    long exec_every = atol(argv[4]);
    struct target targets[MAX_TARGETS];
    int nt = 0;
    for (int i = 5; i < argc && nt < MAX_TARGETS; i++) {
        if (parse_target(argv[i], &targets[nt]) != 0) {
            fprintf(stderr, "bad target %s\n", argv[i]);
            return 3;
        }
        nt++;
    }
    if (rate <= 0 || seconds <= 0 || nt == 0) return 3;

    /* Counts and the schedule, carried across exec in LOADCLIENT_CARRY. */
    long long ok = 0, failed = 0, wrong = 0, execs = 0, max_ns = 0, behind = 0, done = 0;
    long long start = now_ns(CLOCK_MONOTONIC), next = start;
    const char *carry = getenv("LOADCLIENT_CARRY");
    if (carry && sscanf(carry, "%lld %lld %lld %lld %lld %lld %lld %lld %lld", &ok, &failed, &wrong, &execs,
                        &max_ns, &behind, &done, &start, &next) != 9)
        return 3;
    long long deadline = start + seconds * 1000000000LL;
    long long interval = 1000000000LL / rate;
    long long since_exec = 0;
    int stopped = 0;
    unsigned turn = (unsigned)done;

    while (!stopped) {
        long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= deadline) break;
        if (next > now) {
            struct timespec ts = {next / 1000000000LL, next % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
        } else if (now - next > 1000000000LL) {
            next = now; /* more than a second behind: give up on catching up */
            behind++;
        }
        next += interval;
        const struct target *t = &targets[turn++ % (unsigned)nt];
        long long cns = 0;
        int r = one(t, &cns);
        done++;
        since_exec++;
        if (cns > max_ns) max_ns = cns;
        if (r == 0) {
            ok++;
        } else {
            if (r == 1) wrong++;
            else failed++;
            if (failed + wrong <= 200) {
                fprintf(stderr, "FAIL %lld %s %s\n", now_ns(CLOCK_REALTIME) / 1000000LL, t->text,
                        r == 1 ? "wrong-service" : r == -EIO ? "no-greeting" : errname(-r));
            }
        }
        if (done % 50 == 0 && access(stopfile, F_OK) == 0) stopped = 1;
        if (!stopped && exec_every > 0 && since_exec >= exec_every) {
            char env[512];
            snprintf(env, sizeof env, "%lld %lld %lld %lld %lld %lld %lld %lld %lld", ok, failed, wrong, execs + 1,
                     max_ns, behind, done, start, next);
            setenv("LOADCLIENT_CARRY", env, 1);
            fflush(stderr);
            execv("/proc/self/exe", argv);
            fprintf(stderr, "exec failed: %s\n", strerror(errno));
            return 3;
        }
    }
    double secs = (double)(now_ns(CLOCK_MONOTONIC) - start) / 1e9;
    printf("ok=%lld failed=%lld wrong=%lld execs=%lld max_connect_us=%lld behind_s=%lld achieved_rate=%.0f\n", ok,
           failed, wrong, execs, max_ns / 1000, behind, secs > 0 ? (double)done / secs : 0.0);
    return failed + wrong == 0 ? 0 : 2;
}
