/* wanem: the packet element of the testbed's emulated WAN (scistream.netns.wan).
 *
 * Sits between two TUN devices of the router namespace and moves every IP packet the
 * kernel routes into one of them out of the other after a one-way delay (optional
 * jitter), dropping some by a loss model (independent, or in runs: a Gilbert model
 * with a set mean run length). One thread per direction: device A -> device B and
 * B -> A. Each thread owns a ring of timestamped packets (a byte ring of variable-length
 * records: due time, length, bytes) and loops: write every packet that is due, read
 * every packet waiting (non-blocking, up to BATCH per wakeup), sleep in ppoll until the
 * next packet is due or one arrives. Order is kept (a packet is never due before the one
 * read ahead of it, also with jitter), so the ring is a FIFO and needs no heap.
 *
 *   wanem --a tun-a --b tun-b --delay-ab-us 25000 --delay-ba-us 25000 \
 *         [--jitter-us 0] [--loss 1e-4] [--loss-run 1] [--ring-bytes N] [--seed N] [--offload 1] --stats PATH
 *
 * The rate and its queue are not here: a tbf qdisc on each TUN device's egress is the
 * bottleneck, before the delay. Once both devices are attached the element writes its
 * counters to PATH (then again on SIGUSR1, and on SIGTERM/SIGINT before it exits 0):
 * one JSON object with "seq" (incremented per write) and per direction the packets read,
 * sent, lost (the loss model), overflowed (ring full) and write errors (all in packets, a joined
 * packet counting its segments), the IP bytes sent (each segment's headers counted) and the
 * joined (GSO) packets cut because one of their segments was lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAXPKT (65536u + 64u)  /* a TUN read never returns more: a 64 KiB GSO packet and its vnet header */
#define HDR 16u                /* record header: due time (8), length (4), packets in it (4) */
#define PAD_LEN 0xffffffffu    /* a record that fills the ring's end: skip to offset 0 */
#define BATCH 64               /* packets read per wakeup at most */
#define EARLY_NS 20000ull      /* a packet due within 20 us is sent now (fewer wakeups) */

struct rec { uint64_t due; uint32_t len; uint32_t segs; };

/* With offloads (the default) each TUN read/write carries a virtio_net_hdr first, and the kernel
 * hands over TCP segments still joined as one GSO packet (up to 64 KiB): one system call and one
 * pass through the router's forwarding for up to 44 packets of 1500 bytes. The loss model still
 * decides per packet (segment); a GSO packet with a lost segment is cut into its segments here
 * (IPv4/TCP: lengths, IP ids, sequence numbers, flags, checksums) and only the lost ones go. */
static int offload = 1;
static unsigned vhl;  /* sizeof(struct virtio_net_hdr) with offloads, else 0 */

struct dir {
    const char *name;
    int in, out;
    uint64_t delay_ns, jitter_ns;
    double loss, run_exit, good_to_bad;  /* run_exit = 1/mean run; 0: independent losses */
    int bad;
    uint64_t rng;
    unsigned char *ring;
    uint64_t cap, head, tail, last_due;  /* head/tail: byte counts, positions mod cap */
    atomic_uint_least64_t rx, tx, tx_bytes, lost, overflow, werr, cut;
};

static struct dir dirs[2];
static const char *stats_path;
static uint64_t stats_seq;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double uniform(struct dir *d) {  /* xorshift64*, [0, 1) */
    d->rng ^= d->rng >> 12;
    d->rng ^= d->rng << 25;
    d->rng ^= d->rng >> 27;
    return (double)((d->rng * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
}

static int lose(struct dir *d) {
    if (d->loss <= 0)
        return 0;
    if (d->run_exit <= 0)
        return uniform(d) < d->loss;
    /* Gilbert: the state is this packet's fate; stationary loss = loss, mean run = 1/run_exit */
    if (d->bad)
        d->bad = !(uniform(d) < d->run_exit);
    else
        d->bad = uniform(d) < d->good_to_bad;
    return d->bad;
}

static void die(const char *what) {
    fprintf(stderr, "wanem: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int tun_attach(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | (offload ? IFF_VNET_HDR : 0);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "wanem: attach to TUN device %s: %s\n", name, strerror(errno));
        exit(2);
    }
    if (offload && ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN) < 0)
        die("TUNSETOFFLOAD");
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        die("O_NONBLOCK");
    return fd;
}

static inline struct rec *at(struct dir *d, uint64_t off) { return (struct rec *)(d->ring + off % d->cap); }
static inline uint64_t rec_size(uint32_t len) { return (HDR + len + 15u) & ~15ull; }

/* The record at the head, skipping a pad; NULL if the ring is empty. */
static struct rec *first(struct dir *d) {
    while (d->head != d->tail) {
        struct rec *r = at(d, d->head);
        if (r->len != PAD_LEN)
            return r;
        d->head += d->cap - d->head % d->cap;
    }
    return NULL;
}

/* Room for one packet of up to MAXPKT bytes at the tail, or NULL (ring full). */
static unsigned char *reserve(struct dir *d) {
    uint64_t pos = d->tail % d->cap, room = d->cap - pos;
    if (room < HDR + MAXPKT) {  /* not contiguous: pad to the end, start again at 0 */
        if (d->cap - (d->tail - d->head) < room + HDR + MAXPKT)
            return NULL;
        at(d, d->tail)->len = PAD_LEN;
        d->tail += room;
    } else if (d->cap - (d->tail - d->head) < HDR + MAXPKT) {
        return NULL;
    }
    return d->ring + d->tail % d->cap + HDR;
}

static uint32_t csum_add(uint32_t sum, const unsigned char *p, size_t n) {
    for (; n > 1; p += 2, n -= 2)
        sum += (uint32_t)p[0] << 8 | p[1];
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)(v >> 8); p[1] = (unsigned char)v; }
static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put32(unsigned char *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

/* Segment i of a TCP/IPv4 GSO packet (pkt, without vnet header), with full checksums, into out
 * (a vnet header saying "nothing to do", then the packet); returns the bytes written. */
static uint32_t segment(const unsigned char *pkt, uint32_t ihl, uint32_t thl, uint32_t payload, uint32_t gso,
                        uint32_t i, unsigned char *out) {
    uint32_t off = i * gso, len = payload - off < gso ? payload - off : gso, hl = ihl + thl;
    int last = off + len >= payload;
    memset(out, 0, vhl);
    unsigned char *ip = out + vhl, *th = ip + ihl;
    memcpy(ip, pkt, hl);
    memcpy(ip + hl, pkt + hl + off, len);
    put16(ip + 2, (uint16_t)(hl + len));
    put16(ip + 4, (uint16_t)(get16(pkt + 4) + i));
    put16(ip + 10, 0);
    put16(ip + 10, csum_fold(csum_add(0, ip, ihl)));
    put32(th + 4, get32(pkt + ihl + 4) + off);
    if (i > 0)
        th[13] &= (unsigned char)~0x80;           /* CWR: first segment only */
    if (!last)
        th[13] &= (unsigned char)~(0x01 | 0x08);  /* FIN, PSH: last segment only */
    put16(th + 16, 0);
    unsigned char pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = 6;
    put16(pseudo + 10, (uint16_t)(thl + len));
    put16(th + 16, csum_fold(csum_add(csum_add(0, pseudo, 12), th, thl + len)));
    return vhl + hl + len;
}

static void commit(struct dir *d, uint64_t due, uint32_t len, uint32_t segs) {
    *at(d, d->tail) = (struct rec){.due = due, .len = len, .segs = segs};
    d->tail += rec_size(len);
}

static void *run(void *arg) {
    struct dir *d = arg;
    unsigned char *scratch = malloc(MAXPKT);  /* a packet that finds the ring full; a GSO packet being cut */
    unsigned char *lost_at = malloc(65536);   /* per segment of the packet read: lost? */
    if (!scratch || !lost_at)
        die("malloc");
    prctl(PR_SET_TIMERSLACK, 1UL);  /* wake on time: the delay is the point */
    for (;;) {
        /* read what is waiting */
        int got = 0;
        for (int i = 0; i < BATCH; i++) {
            unsigned char *slot = reserve(d);
            ssize_t n = read(d->in, slot ? slot : scratch, MAXPKT);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                die("read");
            }
            if ((size_t)n <= vhl)
                continue;
            got++;
            unsigned char *buf = slot ? slot : scratch;
            const struct virtio_net_hdr *vh = (const struct virtio_net_hdr *)buf;
            const unsigned char *pkt = buf + vhl;
            uint32_t plen = (uint32_t)n - vhl, segs = 1, ihl = 0, thl = 0, payload = 0, gso = 0;
            if (vhl && vh->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
                ihl = (pkt[0] & 15u) * 4;
                if ((vh->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_TCPV4 && pkt[9] == 6
                    && plen > ihl + 20) {
                    thl = (pkt[ihl + 12] >> 4) * 4u;
                    gso = vh->gso_size;
                    payload = plen > ihl + thl ? plen - ihl - thl : 0;
                    if (gso && payload)
                        segs = (payload + gso - 1) / gso;
                }
            }
            atomic_fetch_add_explicit(&d->rx, segs, memory_order_relaxed);
            if (!slot) {
                atomic_fetch_add_explicit(&d->overflow, segs, memory_order_relaxed);
                continue;
            }
            uint32_t nlost = 0;
            for (uint32_t k = 0; k < segs; k++)
                nlost += (lost_at[k] = (unsigned char)lose(d));
            uint64_t due = now_ns() + d->delay_ns;
            if (d->jitter_ns)  /* +-jitter: a negative one wraps around, as a subtraction */
                due += (uint64_t)(int64_t)((uniform(d) * 2.0 - 1.0) * (double)d->jitter_ns);
            if (due < d->last_due)
                due = d->last_due;  /* never ahead of the packet read before it */
            if (nlost)
                atomic_fetch_add_explicit(&d->lost, nlost, memory_order_relaxed);
            if (nlost == segs)
                continue;
            d->last_due = due;
            if (nlost == 0) {
                commit(d, due, (uint32_t)n, segs);
                continue;
            }
            atomic_fetch_add_explicit(&d->cut, 1, memory_order_relaxed);
            memcpy(scratch, buf, (size_t)n);  /* cut it: its segments go into the ring from its slot on */
            for (uint32_t k = 0; k < segs; k++) {
                if (lost_at[k])
                    continue;
                unsigned char *seg = reserve(d);
                if (!seg) {
                    atomic_fetch_add_explicit(&d->overflow, 1, memory_order_relaxed);
                    continue;
                }
                commit(d, due, segment(scratch + vhl, ihl, thl, payload, gso, k, seg), 1);
            }
        }
        /* send what is due */
        uint64_t now = now_ns();
        struct rec *r;
        while ((r = first(d)) && r->due <= now + EARLY_NS) {
            if (write(d->out, (unsigned char *)r + HDR, r->len) < 0) {
                atomic_fetch_add_explicit(&d->werr, r->segs, memory_order_relaxed);
            } else {
                atomic_fetch_add_explicit(&d->tx, r->segs, memory_order_relaxed);
                const unsigned char *pkt = (unsigned char *)r + HDR + vhl;
                uint32_t wire = r->len - vhl;  /* IP bytes as the segments go on a wire: headers each */
                if (r->segs > 1) {
                    uint32_t ihl = (pkt[0] & 15u) * 4;
                    wire += (r->segs - 1) * (ihl + (pkt[ihl + 12] >> 4) * 4u);
                }
                atomic_fetch_add_explicit(&d->tx_bytes, wire, memory_order_relaxed);
            }
            d->head += rec_size(r->len);
        }
        if (got == BATCH)
            continue;  /* more may be waiting */
        /* sleep until the next is due or a packet arrives */
        struct pollfd pfd = {.fd = d->in, .events = POLLIN};
        struct timespec ts, *tsp = NULL;
        if ((r = first(d))) {
            now = now_ns();
            uint64_t wait = r->due > now ? r->due - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull);
            ts.tv_nsec = (long)(wait % 1000000000ull);
            tsp = &ts;
        }
        if (ppoll(&pfd, 1, tsp, NULL) < 0 && errno != EINTR)
            die("ppoll");
    }
    return NULL;
}

static void write_stats(void) {
    char tmp[4096], buf[2048];
    int len = snprintf(buf, sizeof buf, "{\"seq\": %llu", (unsigned long long)++stats_seq);
    for (int i = 0; i < 2; i++) {
        struct dir *d = &dirs[i];
        len += snprintf(buf + len, sizeof buf - len,
                        ", \"%s\": {\"read\": %llu, \"sent\": %llu, \"sent_bytes\": %llu, \"lost\": %llu, "
                        "\"overflow\": %llu, \"write_errors\": %llu, \"cut\": %llu}", d->name,
                        (unsigned long long)atomic_load(&d->rx), (unsigned long long)atomic_load(&d->tx),
                        (unsigned long long)atomic_load(&d->tx_bytes), (unsigned long long)atomic_load(&d->lost),
                        (unsigned long long)atomic_load(&d->overflow), (unsigned long long)atomic_load(&d->werr),
                        (unsigned long long)atomic_load(&d->cut));
    }
    len += snprintf(buf + len, sizeof buf - len, "}\n");
    snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
    FILE *f = fopen(tmp, "w");
    if (!f || fwrite(buf, 1, (size_t)len, f) != (size_t)len || fclose(f) != 0 || rename(tmp, stats_path) != 0)
        die("write stats");
}

static void usage(void) {
    fprintf(stderr, "usage: wanem --a DEV --b DEV --delay-ab-us N --delay-ba-us N [--jitter-us N] [--loss P] "
                    "[--loss-run N] [--ring-bytes N] [--seed N] [--offload 0|1] --stats PATH\n");
    exit(64);
}

int main(int argc, char **argv) {
    const char *a = NULL, *b = NULL;
    double delay_us[2] = {-1, -1}, jitter_us = 0, loss = 0, run_len = 1, ring = 64 << 20;
    unsigned long long seed = 0x5c157ea3ull;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *k = argv[i], *v = argv[++i];
        char *end;
        double x = strtod(v, &end);
        int num = *v && !*end;
        if (!strcmp(k, "--a")) a = v;
        else if (!strcmp(k, "--b")) b = v;
        else if (!strcmp(k, "--stats")) stats_path = v;
        else if (!num) usage();
        else if (!strcmp(k, "--delay-ab-us")) delay_us[0] = x;
        else if (!strcmp(k, "--delay-ba-us")) delay_us[1] = x;
        else if (!strcmp(k, "--jitter-us")) jitter_us = x;
        else if (!strcmp(k, "--loss")) loss = x;
        else if (!strcmp(k, "--loss-run")) run_len = x;
        else if (!strcmp(k, "--ring-bytes")) ring = x;
        else if (!strcmp(k, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--offload")) offload = x != 0;
        else usage();
    }
    if (!a || !b || !stats_path || delay_us[0] < 0 || delay_us[1] < 0 || jitter_us < 0 || loss < 0 || loss >= 1
        || run_len < 1 || ring < 4.0 * (HDR + MAXPKT))
        usage();
    /* Signals go to the main thread only: block them before the threads start. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    /* The path should not wait for the hosts on a busy machine: nice -10 where allowed (root),
     * inherited by both threads. */
    if (setpriority(PRIO_PROCESS, 0, -10) < 0)
        fprintf(stderr, "wanem: running at the default priority (%s)\n", strerror(errno));
    vhl = offload ? (unsigned)sizeof(struct virtio_net_hdr) : 0;
    int fa = tun_attach(a), fb = tun_attach(b);
    const char *names[2] = {"ab", "ba"};
    for (int i = 0; i < 2; i++) {
        struct dir *d = &dirs[i];
        d->name = names[i];
        d->in = i == 0 ? fa : fb;
        d->out = i == 0 ? fb : fa;
        d->delay_ns = (uint64_t)(delay_us[i] * 1000.0);
        d->jitter_ns = (uint64_t)(jitter_us * 1000.0);
        d->loss = loss;
        d->run_exit = run_len > 1 ? 1.0 / run_len : 0;
        d->good_to_bad = run_len > 1 ? loss * d->run_exit / (1.0 - loss) : 0;
        d->rng = (seed + 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1)) | 1;
        d->cap = ((uint64_t)ring + 15) & ~15ull;
        d->ring = mmap(NULL, d->cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (d->ring == MAP_FAILED)
            die("mmap ring");
        pthread_t t;
        if ((errno = pthread_create(&t, NULL, run, d)) != 0)
            die("pthread_create");
    }
    write_stats();  /* ready: both devices attached, both threads running */
    for (;;) {
        int sig;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        write_stats();
        if (sig != SIGUSR1)
            return 0;
    }
}
