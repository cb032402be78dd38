/* A delay line between two network namespaces, for tests and benchmarks that need a real round
 * trip where the kernel has no netem qdisc: two TUN devices, `dla` in the caller's namespace and
 * `dlb` in the namespace of process PEER_PID, and every IP packet read from one is written to the
 * other DELAY_US microseconds later (so the round trip is twice that). Packets keep their order;
 * a full queue drops, as a real link would.
 *
 *   delayline DELAY_US PEER_PID SECONDS
 *
 * Prints "ready" once both devices exist (the caller then gives them addresses and routes), and
 * stops by itself after SECONDS. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 8192
#define MTU 2048

struct packet {
    long long due_ns;
    int len;
    char data[MTU];
};

struct line {
    int from, to;
    long long delay_ns;
    struct packet *ring;
};

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int tun(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/net/tun");
        exit(1);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        perror("TUNSETIFF");
        exit(1);
    }
    return fd;
}

/* One direction: read what arrives, write what is due; waits in ppoll until the earlier of
 * the two. */
static void *pump(void *arg) {
    struct line *l = arg;
    unsigned head = 0, tail = 0; /* ring[head..tail) queued */
    for (;;) {
        long long now = now_ns();
        while (head != tail && l->ring[head % SLOTS].due_ns <= now) {
            struct packet *p = &l->ring[head % SLOTS];
            if (write(l->to, p->data, p->len) < 0) {
                /* a device going down: drop */
            }
            head++;
        }
        struct pollfd pfd = {.fd = l->from, .events = POLLIN};
        struct timespec wait = {1, 0};
        if (head != tail) {
            long long left = l->ring[head % SLOTS].due_ns - now;
            if (left < 0) left = 0;
            wait.tv_sec = left / 1000000000LL;
            wait.tv_nsec = left % 1000000000LL;
        }
        if (ppoll(&pfd, 1, &wait, NULL) > 0 && (pfd.revents & POLLIN)) {
            for (int burst = 0; burst < 64; burst++) {
                struct packet *p = &l->ring[tail % SLOTS];
                int n = read(l->from, p->data, MTU);
                if (n <= 0) break;
                if (tail - head >= SLOTS) continue; /* full: drop it */
                p->len = n;
                p->due_ns = now_ns() + l->delay_ns;
                tail++;
                struct pollfd again = {.fd = l->from, .events = POLLIN};
                if (poll(&again, 1, 0) <= 0) break;
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: delayline DELAY_US PEER_PID SECONDS\n");
        return 2;
    }
    long long delay_ns = atoll(argv[1]) * 1000LL;
    int seconds = atoi(argv[3]);
    if (seconds <= 0 || seconds > 3600) {
        fprintf(stderr, "SECONDS is 1 to 3600\n");
        return 2;
    }
    int a = tun("dla");
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/ns/net", argv[2]);
    int ns = open(path, O_RDONLY | O_CLOEXEC);
    if (ns < 0 || setns(ns, CLONE_NEWNET) < 0) {
        perror(path);
        return 1;
    }
    int b = tun("dlb");
    static struct line ab, ba;
    ab = (struct line){a, b, delay_ns, calloc(SLOTS, sizeof(struct packet))};
    ba = (struct line){b, a, delay_ns, calloc(SLOTS, sizeof(struct packet))};
    if (!ab.ring || !ba.ring) return 1;
    pthread_t t1, t2;
    pthread_create(&t1, NULL, pump, &ab);
    pthread_create(&t2, NULL, pump, &ba);
    printf("ready\n");
    fflush(stdout);
    sleep(seconds);
    return 0;
}
