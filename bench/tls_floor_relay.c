/* One relay process of bench/tls_floor, in C: the ``ctypes-2pair`` design without Python.
 *
 *     tls_floor_relay ROLE LISTEN_PORT TARGET_PORT CERT KEY [CIPHERSUITES]
 *
 * ROLE "client": plain in, TLS out to TARGET_PORT; "server": TLS in, plain out. A thread per
 * connection, each with its own poll loop over its two sockets (one SSL object, one thread).
 * One BIO pair both ways: recv straight into its ring, OpenSSL reads records from there
 * (no read-ahead), SSL_read into a 256 KiB buffer until it wants more; SSL_write 256 KiB
 * into the ring, sent from the ring in place. SSL_shutdown once (close_notify out) when the
 * plain side says EOF. It is how far the same design gets when no interpreter runs per
 * record: the floor of an OpenSSL-based user-space relay here. bench/tls_floor builds it
 * with cc at run time (libssl-dev), or leaves it out.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static SSL_CTX *ctx;
static int server_role, target_port;

static void tune(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int connect_to(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    tune(fd);
    return fd;
}

struct conn { int pfd, tfd; };

static void *serve(void *arg) {
    struct conn *c = arg;
    int pfd = c->pfd, tfd = c->tfd;
    free(c);
    unsigned char *ebuf = malloc(CHUNK), *dbuf = malloc(CHUNK);
    SSL *ssl = SSL_new(ctx);
    BIO *inner = NULL, *ext = NULL;
    SSL_set_fd(ssl, tfd);
    if ((server_role ? SSL_accept(ssl) : SSL_connect(ssl)) != 1) {   /* blocking */
        fprintf(stderr, "handshake failed\n");
        goto out;
    }
    fprintf(stderr, "cipher %s\n", SSL_CIPHER_get_name(SSL_get_current_cipher(ssl)));
    if (BIO_new_bio_pair(&inner, 2 * CHUNK, &ext, 2 * CHUNK) != 1) goto out;
    SSL_set_bio(ssl, inner, inner);   /* frees the socket BIO */
    fcntl(pfd, F_SETFL, fcntl(pfd, F_GETFL) | O_NONBLOCK);
    fcntl(tfd, F_SETFL, fcntl(tfd, F_GETFL) | O_NONBLOCK);

    size_t wlen = 0, plen = 0, poff = 0;
    int plain_eof = 0, shut_sent = 0, enc_done = 0, peer_closed = 0, dec_done = 0, tls_eof = 0;
    int p_rd = 1, p_wr = 1, t_rd = 1, t_wr = 1;
    for (;;) {
        int progress;
        do {
            progress = 0;
            /* ciphertext: ring -> TLS socket */
            while (t_wr) {
                char *p;
                int n = BIO_nread0(ext, &p);
                if (n <= 0) break;
                ssize_t s = send(tfd, p, n, MSG_NOSIGNAL);
                if (s < 0) {
                    if (errno != EAGAIN) goto out;
                    t_wr = 0;
                    break;
                }
                BIO_nread(ext, &p, (int)s);
                progress = 1;
            }
            /* encrypt: plain socket -> SSL_write -> ring */
            if (!enc_done) {
                if (wlen) {
                    int r = SSL_write(ssl, ebuf, (int)wlen);
                    if (r > 0) {
                        wlen = 0;
                        progress = 1;
                    } else if (SSL_get_error(ssl, r) != SSL_ERROR_WANT_WRITE) {
                        goto out;
                    }
                } else if (plain_eof) {
                    if (!shut_sent) {
                        SSL_shutdown(ssl);   /* once: close_notify into the ring, nothing read */
                        shut_sent = progress = 1;
                    } else if (BIO_ctrl_pending(ext) == 0) {
                        shutdown(tfd, SHUT_WR);
                        enc_done = progress = 1;
                    }
                } else if (p_rd) {
                    ssize_t n = recv(pfd, ebuf, CHUNK, 0);
                    if (n > 0) {
                        wlen = (size_t)n;
                        progress = 1;
                    } else if (n == 0) {
                        plain_eof = progress = 1;
                    } else if (errno == EAGAIN) {
                        p_rd = 0;
                    } else {
                        goto out;
                    }
                }
            }
            /* decrypt: TLS socket -> ring -> SSL_read -> plain socket */
            if (!dec_done) {
                if (plen) {
                    if (p_wr) {
                        ssize_t s = send(pfd, dbuf + poff, plen - poff, MSG_NOSIGNAL);
                        if (s < 0) {
                            if (errno != EAGAIN) goto out;
                            p_wr = 0;
                        } else {
                            poff += (size_t)s;
                            if (poff == plen) plen = poff = 0;
                            progress = 1;
                        }
                    }
                } else if (peer_closed) {
                    shutdown(pfd, SHUT_WR);
                    dec_done = progress = 1;
                } else {
                    size_t got = 0;
                    while (got < CHUNK) {
                        int r = SSL_read(ssl, dbuf + got, (int)(CHUNK - got));
                        if (r > 0) {
                            got += (size_t)r;
                            continue;
                        }
                        int e = SSL_get_error(ssl, r);
                        if (e == SSL_ERROR_ZERO_RETURN) {
                            peer_closed = progress = 1;
                            break;
                        }
                        if (e == SSL_ERROR_WANT_WRITE) break;
                        if (e != SSL_ERROR_WANT_READ) goto out;
                        if (!t_rd || tls_eof) break;
                        char *p;
                        int room = BIO_nwrite0(ext, &p);
                        if (room <= 0) break;
                        ssize_t n = recv(tfd, p, room, 0);
                        if (n > 0) {
                            BIO_nwrite(ext, &p, (int)n);
                        } else if (n == 0) {
                            tls_eof = 1;
                            BIO_shutdown_wr(ext);
                        } else if (errno == EAGAIN) {
                            t_rd = 0;
                            break;
                        } else {
                            goto out;
                        }
                    }
                    if (got) {
                        plen = got;
                        progress = 1;
                    }
                }
            }
            if (enc_done && dec_done) goto out;
        } while (progress);
        struct pollfd fds[2] = {{.fd = pfd}, {.fd = tfd}};
        if (!p_rd && !enc_done && !wlen && !plain_eof) fds[0].events |= POLLIN;
        if (!p_wr && plen) fds[0].events |= POLLOUT;
        if (!t_rd && !dec_done && !plen && !peer_closed) fds[1].events |= POLLIN;
        if (!t_wr && BIO_ctrl_pending(ext) > 0) fds[1].events |= POLLOUT;
        if (poll(fds, 2, 1000) < 0 && errno != EINTR) goto out;
        for (int i = 0; i < 2; i++) {
            short ev = fds[i].revents;
            if (ev & (POLLIN | POLLHUP | POLLERR)) *(i ? &t_rd : &p_rd) = 1;
            if (ev & (POLLOUT | POLLHUP | POLLERR)) *(i ? &t_wr : &p_wr) = 1;
        }
        if (fds[0].events == 0 && fds[1].events == 0) p_rd = p_wr = t_rd = t_wr = 1;   /* nothing asked: retry */
    }
out:
    ERR_clear_error();
    SSL_free(ssl);   /* and its BIOs */
    if (ext) BIO_free(ext);
    close(pfd);
    close(tfd);
    free(ebuf);
    free(dbuf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s client|server LISTEN_PORT TARGET_PORT CERT KEY [CIPHERSUITES]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    server_role = strcmp(argv[1], "server") == 0;
    int listen_port = atoi(argv[2]);
    target_port = atoi(argv[3]);
    ctx = SSL_CTX_new(TLS_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (argc > 6 && argv[6][0] && SSL_CTX_set_ciphersuites(ctx, argv[6]) != 1) return 2;
    if (server_role && (SSL_CTX_use_certificate_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1 ||
                        SSL_CTX_use_PrivateKey_file(ctx, argv[5], SSL_FILETYPE_PEM) != 1)) {
        fprintf(stderr, "cannot load the certificate\n");
        return 2;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(listen_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 128) != 0) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;
        tune(fd);
        int other = connect_to(target_port);
        if (other < 0) {
            close(fd);
            continue;
        }
        struct conn *c = malloc(sizeof *c);
        c->pfd = server_role ? other : fd;
        c->tfd = server_role ? fd : other;
        pthread_t t;
        pthread_create(&t, NULL, serve, c);
        pthread_detach(t);
    }
}
