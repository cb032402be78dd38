// The catch path: cgroup connect4/connect6 programs that send a connect to a magic address
// straight to a backend, inside connect(), for programs the hook cannot enter (Go, static
// binaries, io_uring, a cleaned environment). The daemon (src/catch.rs) fills `services` from
// the routing table: for each magic address and client port (port 0: every port without a
// mapping of its own) the service's weighted round-robin schedule over its candidates, so
// health, drains, ejections and the guard apply as for hooked connects.
//
// Only connects made in the daemon's own network namespace are touched (its netns cookie is in
// `config`), so one daemon per namespace can attach at the root cgroup side by side. A magic
// address with no usable backend refuses the connect (EPERM) rather than let it reach whatever
// listens on a wildcard address. Hooked programs never get here with a magic address: the hook
// has already put a backend in its place.
//
// Built by build.rs with clang -target bpf; loaded with aya.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_SCHEDULE 64
#define SOCK_STREAM 1

struct key {
    __u32 ip;    // network byte order
    __u16 port;  // network byte order; 0: any port without a mapping of its own
    __u16 pad;
};

struct backend {
    __u32 ip;    // network byte order
    __u16 port;  // network byte order
    __u16 pad;
};

struct service {
    __u32 len;     // schedule entries in use, at most MAX_SCHEDULE; 0: no usable backend
    __u32 turn;    // round-robin position, advanced atomically
    __u64 caught;  // connects sent to a backend
    struct backend schedule[MAX_SCHEDULE];
};

struct config {
    __u32 net;      // the IPv4 magic range, network byte order
    __u32 mask;     // 0: off
    __u64 netns;    // the daemon's network namespace cookie
};

// A program that bypassed the hook, reported once per process.
struct event {
    __u32 pid;
    __u32 uid;
    __u32 ip;       // the magic address it connected to
    __u16 port;     // network byte order
    __u16 pad;
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct key);
    __type(value, struct service);
} services SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, __u8);
} seen SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 65536);
} events SEC(".maps");

static __always_inline void note(__u32 ip, __u16 port) {
    __u32 pid = bpf_get_current_pid_tgid() >> 32;
    __u8 one = 1;
    if (bpf_map_lookup_elem(&seen, &pid))
        return;
    bpf_map_update_elem(&seen, &pid, &one, BPF_ANY);
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return;
    e->pid = pid;
    e->uid = (__u32)bpf_get_current_uid_gid();
    e->ip = ip;
    e->port = port;
    e->pad = 0;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_ringbuf_submit(e, 0);
}

// The backend for a connect to ip:port (network order), if the address is magic and ours.
// Returns 1 to rewrite (into *to), 0 to leave alone, -1 to refuse.
static __always_inline int route(struct bpf_sock_addr *ctx, __u32 ip, __u16 port,
                                 struct backend *to) {
    __u32 zero = 0;
    struct config *c = bpf_map_lookup_elem(&config, &zero);
    if (!c || c->mask == 0 || (ip & c->mask) != c->net)
        return 0;
    if (ctx->type != SOCK_STREAM || bpf_get_netns_cookie(ctx) != c->netns)
        return 0;
    struct key k = {.ip = ip, .port = port, .pad = 0};
    struct service *s = bpf_map_lookup_elem(&services, &k);
    if (!s) {
        k.port = 0;
        s = bpf_map_lookup_elem(&services, &k);
    }
    if (!s || s->len == 0 || s->len > MAX_SCHEDULE)
        return -1;
    __u32 i = __sync_fetch_and_add(&s->turn, 1) % s->len;
    if (i >= MAX_SCHEDULE)
        return -1;
    *to = s->schedule[i];
    __sync_fetch_and_add(&s->caught, 1);
    note(ip, port);
    return 1;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx) {
    struct backend to;
    int r = route(ctx, ctx->user_ip4, (__u16)ctx->user_port, &to);
    if (r < 0)
        return 0;
    if (r > 0) {
        ctx->user_ip4 = to.ip;
        ctx->user_port = to.port;
    }
    return 1;
}

// AF_INET6 sockets reach IPv4 magic addresses as v4-mapped (::ffff:a.b.c.d), as the JVM does;
// the backend is given the same way.
SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx) {
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff))
        return 1;
    struct backend to;
    int r = route(ctx, ctx->user_ip6[3], (__u16)ctx->user_port, &to);
    if (r < 0)
        return 0;
    if (r > 0) {
        ctx->user_ip6[3] = to.ip;
        ctx->user_port = to.port;
    }
    return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
