/* One minimal relay process of bench/relay_floor, compiled: the built-in data server's
 * design (one thread, one edge-triggered epoll loop, non-blocking sockets) with no
 * interpreter anywhere.
 *
 *     relay_floor MODE LISTEN_PORT TARGET_PORT SPIN_US SNDBUF
 *
 * MODE "copy": recv up to 1 MiB into one buffer, send; what the destination did not take
 * is kept per direction and goes first next time (the data server's Copier). MODE
 * "splice": socket -> 1 MiB pipe -> socket, SPLICE_F_NONBLOCK. SPIN_US > 0: while the
 * recent waits ended within it, poll epoll without sleeping (sched_yield between) for up
 * to SPIN_US before sleeping, and stop at a yield that ran another task (the data
 * server's spin, evloop._wait_spinning). SNDBUF > 0: SO_SNDBUF of both sockets of each
 * connection (the data server's loopback send buffer). Loopback only; prints "ready"
 * once it listens. If this relay is no faster than the data server, the data server's
 * own code (its interpreter, its event dispatch) is not what limits a chain.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

struct side {
    int fd, readable, writable, eof;       /* eof: this side said EOF (read side) */
    struct side *peer;
    struct conn *conn;
    char *rest; size_t rest_len, rest_off;  /* copy: bytes for this side not yet sent */
    int pr, pw; size_t inpipe;              /* splice: this side's incoming bytes */
};
struct conn { struct side s[2]; int closed; };

static int splice_mode;
static char buf[CHUNK];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Move src -> dst until a socket says EAGAIN; -1 on an error (the connection goes). */
static int copy(struct side *src, struct side *dst) {
    for (;;) {
        if (dst->rest_len) {
            if (!dst->writable) return 0;
            ssize_t n = send(dst->fd, dst->rest + dst->rest_off, dst->rest_len, MSG_NOSIGNAL);
            if (n < 0) { if (errno == EAGAIN) { dst->writable = 0; return 0; } return -1; }
            dst->rest_off += n; dst->rest_len -= n;
            continue;
        }
        if (src->eof || !src->readable || !dst->writable) return 0;
        ssize_t n = recv(src->fd, buf, CHUNK, 0);
        if (n < 0) { if (errno == EAGAIN) { src->readable = 0; return 0; } return -1; }
        if (n == 0) { src->eof = 1; shutdown(dst->fd, SHUT_WR); return 0; }
        ssize_t m = send(dst->fd, buf, n, MSG_NOSIGNAL);
        if (m < 0) { if (errno != EAGAIN) return -1; m = 0; }
        if (m < n) {
            if (!dst->rest && !(dst->rest = malloc(CHUNK))) return -1;
            memcpy(dst->rest, buf + m, n - m);
            dst->rest_off = 0; dst->rest_len = n - m; dst->writable = 0;
            return 0;
        }
    }
}

static int splice_pump(struct side *src, struct side *dst) {
    for (;;) {
        int moved = 0;
        if (src->inpipe && dst->writable) {
            ssize_t n = splice(src->pr, NULL, dst->fd, NULL, src->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0) { if (errno != EAGAIN) return -1; dst->writable = 0; }
            else if (n > 0) { src->inpipe -= n; moved = 1; }
        }
        if (!src->eof && src->readable && src->inpipe < CHUNK) {
            ssize_t n = splice(src->fd, NULL, src->pw, NULL, CHUNK - src->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0) { if (errno != EAGAIN) return -1; if (!src->inpipe) src->readable = 0; }
            else if (n == 0) { src->eof = 1; moved = 1; }
            else { src->inpipe += n; moved = 1; }
        }
        if (src->eof && !src->inpipe) {
            if (src->eof == 1) { shutdown(dst->fd, SHUT_WR); src->eof = 2; }
            return 0;
        }
        if (!moved) return 0;
    }
}

static int done(struct side *s) { return s->eof && !s->inpipe && !s->peer->rest_len; }

static void close_conn(int ep, struct conn *c) {
    for (int i = 0; i < 2; i++) {
        struct side *s = &c->s[i];
        epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        if (splice_mode) { close(s->pr); close(s->pw); }
        free(s->rest);
    }
    c->closed = 1;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: relay_floor copy|splice LISTEN_PORT TARGET_PORT SPIN_US SNDBUF\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    splice_mode = !strcmp(argv[1], "splice");
    int lport = atoi(argv[2]), tport = atoi(argv[3]), sndbuf = atoi(argv[5]), one = 1;
    double spin = atoi(argv[4]) / 1e6;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(lport), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&la, sizeof la) || listen(ls, 128)) { perror("listen"); return 1; }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[64];
    struct conn *dead[64];
    int recent = 0;   /* > 0: the recent waits ended within the spin */
    for (;;) {
        int n = 0;
        double start = now();
        if (spin > 0 && recent > 0) {
            double end = start + spin, t = start;
            while ((n = epoll_wait(ep, evs, 64, 0)) == 0) {
                sched_yield();
                double before = t;
                t = now();
                if (t - before > 20e-6) { recent = 0; break; }
                if (t >= end) break;
            }
        }
        if (n == 0) n = epoll_wait(ep, evs, 64, -1);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        if (spin > 0) {
            if (now() - start < spin) { if (recent < 4) recent++; }
            else if (recent > 0) recent--;
        }
        int ndead = 0;
        for (int i = 0; i < n; i++) {
            struct side *s = evs[i].data.ptr;
            if (!s) {
                int a;
                while ((a = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
                    struct sockaddr_in ta = {.sin_family = AF_INET, .sin_port = htons(tport),
                                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
                    struct conn *c = calloc(1, sizeof *c);
                    int fds[2] = {a, b};
                    for (int k = 0; k < 2; k++) {
                        struct side *x = &c->s[k];
                        x->fd = fds[k]; x->peer = &c->s[1 - k]; x->conn = c;
                        setsockopt(x->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                        if (sndbuf > 0) setsockopt(x->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
                        if (splice_mode) {
                            int p[2];
                            if (pipe2(p, O_NONBLOCK | O_CLOEXEC)) { perror("pipe2"); return 1; }
                            fcntl(p[1], F_SETPIPE_SZ, CHUNK);
                            x->pr = p[0]; x->pw = p[1];
                        }
                    }
                    if (connect(b, (struct sockaddr *)&ta, sizeof ta) && errno != EINPROGRESS) {
                        perror("connect"); close_conn(ep, c); free(c); continue;
                    }
                    for (int k = 0; k < 2; k++) {
                        struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->s[k]};
                        epoll_ctl(ep, EPOLL_CTL_ADD, c->s[k].fd, &e);
                    }
                }
                continue;
            }
            struct conn *c = s->conn;
            if (c->closed) continue;
            uint32_t ev = evs[i].events;
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->readable = 1;
            if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->writable = 1;
            int bad = splice_mode ? (splice_pump(s, s->peer) < 0 || splice_pump(s->peer, s) < 0)
                                  : (copy(s, s->peer) < 0 || copy(s->peer, s) < 0);
            if (bad || (ev & EPOLLERR) || (done(&c->s[0]) && done(&c->s[1]))) {
                close_conn(ep, c);
                dead[ndead++] = c;   /* freed after this batch: later events may point at it */
            }
        }
        for (int i = 0; i < ndead; i++) free(dead[i]);
    }
}
