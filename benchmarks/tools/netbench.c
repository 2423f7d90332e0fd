/*
 * netbench: the data-path end of Sluice's benchmark harness (benchmarks/README.md).
 *
 *   netbench serve [--tcp PORT] [--udp PORT] [--threads N]
 *       Listens on 0.0.0.0 (every address of its network namespace).
 *       UDP: answers every datagram with the address it was sent to ("10.244.16.10\n"),
 *            from that address, so a prober learns which endpoint the proxy chose.
 *       TCP: reads one request (up to the first read), answers a short HTTP/1.0 reply
 *            carrying the local address, and closes. One connection = one request, so
 *            every request is a new flow through the proxy's rules.
 *       Prints "ready" once listening; runs until killed.
 *
 *   netbench load --target IP:PORT [--threads N] [--seconds T] [--warmup W]
 *       N closed-loop clients; each connects, sends a request, reads the reply to EOF,
 *       closes (with a reset: no TIME_WAIT), and records the time of the whole exchange. After W seconds of warm-up
 *       it measures for T seconds and prints one JSON line:
 *       {"requests":..,"errors":..,"seconds":..,"rps":..,"p50_us":..,"p90_us":..,
 *        "p99_us":..,"mean_us":..,"max_us":..}
 *
 * Plain C (POSIX + pthreads) so the load generator costs the machine as little as
 * possible; built by the harness with the Swift toolchain's clang (or cc).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char REQUEST[] = "GET / HTTP/1.0\r\n\r\n";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "netbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---------------------------------------------------------------- serve */

static int tcp_listener;

static void *tcp_worker(void *arg) {
    (void)arg;
    char buf[4096];
    for (;;) {
        struct sockaddr_in local;
        socklen_t len = sizeof local;
        int c = accept(tcp_listener, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) continue;
            die("accept");
        }
        ssize_t n = recv(c, buf, sizeof buf, 0);
        (void)n;
        char addr[INET_ADDRSTRLEN] = "?";
        if (getsockname(c, (struct sockaddr *)&local, &len) == 0) inet_ntop(AF_INET, &local.sin_addr, addr, sizeof addr);
        char body[64], reply[256];
        int bl = snprintf(body, sizeof body, "%s\n", addr);
        int rl = snprintf(reply, sizeof reply, "HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", bl, body);
        ssize_t off = 0;
        while (off < rl) {
            ssize_t w = send(c, reply + off, (size_t)(rl - off), MSG_NOSIGNAL);
            if (w <= 0) break;
            off += w;
        }
        close(c);
    }
    return NULL;
}

static void *udp_worker(void *arg) {
    int s = *(int *)arg;
    char buf[2048], cbuf[256];
    for (;;) {
        struct sockaddr_in peer;
        struct iovec iov = {buf, sizeof buf};
        struct msghdr m = {0};
        m.msg_name = &peer;
        m.msg_namelen = sizeof peer;
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        ssize_t n = recvmsg(s, &m, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvmsg");
        }
        struct in_pktinfo *pi = NULL;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) pi = (struct in_pktinfo *)CMSG_DATA(c);
        if (!pi) continue;
        char addr[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &pi->ipi_addr, addr, sizeof addr);
        char out[64];
        int ol = snprintf(out, sizeof out, "%s\n", addr);
        /* Answer from the address the datagram was sent to. */
        char obuf[CMSG_SPACE(sizeof(struct in_pktinfo))];
        memset(obuf, 0, sizeof obuf);
        struct iovec oiov = {out, (size_t)ol};
        struct msghdr om = {0};
        om.msg_name = &peer;
        om.msg_namelen = sizeof peer;
        om.msg_iov = &oiov;
        om.msg_iovlen = 1;
        om.msg_control = obuf;
        om.msg_controllen = sizeof obuf;
        struct cmsghdr *oc = CMSG_FIRSTHDR(&om);
        oc->cmsg_level = IPPROTO_IP;
        oc->cmsg_type = IP_PKTINFO;
        oc->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        struct in_pktinfo opi = {0};
        opi.ipi_spec_dst = pi->ipi_addr;
        memcpy(CMSG_DATA(oc), &opi, sizeof opi);
        sendmsg(s, &om, 0);
    }
    return NULL;
}

static int serve(int tcp_port, int udp_port, int threads) {
    int one = 1;
    pthread_t t;
    if (tcp_port) {
        tcp_listener = socket(AF_INET, SOCK_STREAM, 0);
        if (tcp_listener < 0) die("socket");
        setsockopt(tcp_listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)tcp_port), .sin_addr.s_addr = htonl(INADDR_ANY)};
        if (bind(tcp_listener, (struct sockaddr *)&a, sizeof a) < 0) die("bind tcp");
        if (listen(tcp_listener, 4096) < 0) die("listen");
        for (int i = 0; i < threads; i++)
            if (pthread_create(&t, NULL, tcp_worker, NULL) != 0) die("pthread_create");
    }
    static int udp;
    if (udp_port) {
        udp = socket(AF_INET, SOCK_DGRAM, 0);
        if (udp < 0) die("socket");
        setsockopt(udp, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)udp_port), .sin_addr.s_addr = htonl(INADDR_ANY)};
        if (bind(udp, (struct sockaddr *)&a, sizeof a) < 0) die("bind udp");
        if (pthread_create(&t, NULL, udp_worker, &udp) != 0) die("pthread_create");
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

/* ----------------------------------------------------------------- load */

struct worker {
    pthread_t thread;
    struct sockaddr_in target;
    uint32_t *lat_us;      /* latencies of measured requests, microseconds */
    size_t cap, n;
    long errors;
};

static atomic_int phase; /* 0 warm-up, 1 measuring, 2 stop */

static int one_request(const struct sockaddr_in *target) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int ok = -1;
    if (connect(s, (const struct sockaddr *)target, sizeof *target) == 0 &&
        send(s, REQUEST, sizeof REQUEST - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof REQUEST - 1)) {
        char buf[512];
        size_t got = 0;
        for (;;) {
            ssize_t n = recv(s, buf, sizeof buf, 0);
            if (n < 0) { got = 0; break; }
            if (n == 0) break;
            got += (size_t)n;
        }
        if (got > 0) ok = 0;
    }
    /* Abort instead of a FIN: the server has already closed its side, so neither end keeps a
     * TIME_WAIT socket (nor the node a conntrack entry in TIME_WAIT for two minutes). With
     * tens of thousands of connections a run, TIME_WAIT 4-tuples would otherwise be reused
     * and SYNs answered with a 1 s retransmission: an artefact of the load generator. */
    struct linger lg = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(s);
    return ok;
}

static void *load_worker(void *arg) {
    struct worker *w = arg;
    while (atomic_load(&phase) < 2) {
        double t0 = now_s();
        int r = one_request(&w->target);
        double t1 = now_s();
        if (atomic_load(&phase) != 1) continue;
        if (r != 0) { w->errors++; continue; }
        if (w->n < w->cap) w->lat_us[w->n++] = (uint32_t)((t1 - t0) * 1e6);
    }
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int load(const char *target, int threads, double seconds, double warmup) {
    char host[64];
    const char *colon = strrchr(target, ':');
    if (!colon || (size_t)(colon - target) >= sizeof host) { fprintf(stderr, "netbench: --target wants IP:PORT\n"); return 2; }
    memcpy(host, target, (size_t)(colon - target));
    host[colon - target] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { fprintf(stderr, "netbench: bad address %s\n", host); return 2; }
    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    for (int i = 0; i < threads; i++) {
        ws[i].target = a;
        ws[i].cap = 4u << 20;
        ws[i].lat_us = malloc(ws[i].cap * sizeof(uint32_t));
        if (!ws[i].lat_us) die("malloc");
        if (pthread_create(&ws[i].thread, NULL, load_worker, &ws[i]) != 0) die("pthread_create");
    }
    struct timespec ts = {(time_t)warmup, (long)((warmup - (time_t)warmup) * 1e9)};
    nanosleep(&ts, NULL);
    double start = now_s();
    atomic_store(&phase, 1);
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (time_t)seconds) * 1e9);
    nanosleep(&ts, NULL);
    atomic_store(&phase, 2);
    double elapsed = now_s() - start;
    size_t total = 0;
    long errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].thread, NULL);
        total += ws[i].n;
        errors += ws[i].errors;
    }
    uint32_t *all = malloc((total ? total : 1) * sizeof(uint32_t));
    size_t k = 0;
    double sum = 0;
    for (int i = 0; i < threads; i++)
        for (size_t j = 0; j < ws[i].n; j++) { all[k++] = ws[i].lat_us[j]; sum += ws[i].lat_us[j]; }
    qsort(all, total, sizeof(uint32_t), cmp_u32);
#define PCT(p) (total ? all[(size_t)((double)(total - 1) * (p))] : 0)
    printf("{\"requests\":%zu,\"errors\":%ld,\"seconds\":%.3f,\"rps\":%.1f,\"p50_us\":%u,\"p90_us\":%u,\"p99_us\":%u,"
           "\"mean_us\":%.1f,\"max_us\":%u,\"threads\":%d}\n",
           total, errors, elapsed, (double)total / elapsed, PCT(0.50), PCT(0.90), PCT(0.99),
           total ? sum / (double)total : 0.0, total ? all[total - 1] : 0, threads);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) goto usage;
    if (strcmp(argv[1], "serve") == 0) {
        int tcp = 0, udp = 0, threads = 4;
        for (int i = 2; i + 1 < argc; i += 2) {
            if (strcmp(argv[i], "--tcp") == 0) tcp = atoi(argv[i + 1]);
            else if (strcmp(argv[i], "--udp") == 0) udp = atoi(argv[i + 1]);
            else if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[i + 1]);
            else goto usage;
        }
        if (!tcp && !udp) goto usage;
        return serve(tcp, udp, threads < 1 ? 1 : threads);
    }
    if (strcmp(argv[1], "load") == 0) {
        const char *target = NULL;
        int threads = 2;
        double seconds = 3, warmup = 0.5;
        for (int i = 2; i + 1 < argc; i += 2) {
            if (strcmp(argv[i], "--target") == 0) target = argv[i + 1];
            else if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[i + 1]);
            else if (strcmp(argv[i], "--seconds") == 0) seconds = atof(argv[i + 1]);
            else if (strcmp(argv[i], "--warmup") == 0) warmup = atof(argv[i + 1]);
            else goto usage;
        }
        if (!target || threads < 1 || seconds <= 0) goto usage;
        return load(target, threads, seconds, warmup);
    }
usage:
    fprintf(stderr, "usage: netbench serve [--tcp PORT] [--udp PORT] [--threads N]\n"
                    "       netbench load --target IP:PORT [--threads N] [--seconds T] [--warmup W]\n");
    return 2;
}
