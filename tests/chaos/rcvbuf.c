/* rcvbuf: an LD_PRELOAD shim for experiments (tests/chaos/soak.sh DAEMON_RCVBUF=BYTES): every UDP
 * socket the program binds gets SO_RCVBUF = $RCVBUF_BYTES first (the kernel caps it at
 * net.core.rmem_max). discotech does not set SO_RCVBUF itself; this shows what a larger receive
 * queue changes under load, without changing the daemon.
 *
 *   cc -O2 -shared -fPIC -o rcvbuf.so rcvbuf.c -ldl
 *   RCVBUF_BYTES=4194304 LD_PRELOAD=./rcvbuf.so discotech serve ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    int type = 0;
    socklen_t tl = sizeof type;
    const char *bytes = getenv("RCVBUF_BYTES");
    if (bytes && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_DGRAM) {
        int n = atoi(bytes);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &n, sizeof n);
    }
    return real_bind(fd, addr, len);
}
