/* greeter: a backend that says who it is. Listens on ADDR:PORT (TCP), writes "NAME\n" to every
 * connection and closes it. Exits after SECONDS (default 60) so a forgotten one cannot linger.
 *
 *   greeter NAME ADDR PORT [SECONDS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: greeter NAME ADDR PORT [SECONDS]\n");
        return 3;
    }
    alarm(argc > 4 ? (unsigned)atoi(argv[4]) : 60);
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &sin.sin_addr) != 1) return 3;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, 1024) < 0) {
        perror("greeter: bind/listen");
        return 2;
    }
    printf("listening\n");
    fflush(stdout);
    char line[256];
    int len = snprintf(line, sizeof line, "%s\n", argv[1]);
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        ssize_t w = write(c, line, (size_t)len);
        (void)w;
        close(c);
    }
}
