/* The hot paths of the built-in data server, compiled: a TLS leg's bytes after its handshake
 * (``Engine``), and a plain leg's copy (``Copier``), with no interpreter per chunk; and the
 * UDP relay's batches with their AEAD (``udp_pass``, ``UdpDir``: see "UDP" below).
 *
 * ``tlsleg.TlsEnd`` makes the handshake with an ``ssl.SSLObject`` over two memory BIOs (its
 * bound, session resumption and certificate checks stay in Python). Once it is up,
 * ``Engine(sslobj, pending_in, pending_out, eof_in)`` takes the SSL* of that SSLObject
 * over: it swaps the memory BIOs for a BIO pair (the bytes they still hold are moved
 * along), and from then on every byte goes through these calls:
 *
 *     n, flags = eng.encrypt(plain_fd, tls_fd, readable, writable)   # plain -> records
 *     n, flags = eng.decrypt(tls_fd, plain_fd, readable, writable)   # records -> plain
 *     eng.shutdown()                                                 # close_notify, once
 *
 * Each runs until a socket says EAGAIN (the loop is edge-triggered), the plain side says
 * EOF or the peer's close_notify arrives, and returns the plaintext bytes it moved and
 * F_* flags; or raises (OSError, ssl.SSLError) with the plaintext bytes it moved before
 * the failure as the exception's ``moved`` (they are on their way: the caller counts them).
 * ``recv`` writes ciphertext straight into the pair's ring and OpenSSL reads its
 * records from there; SSL_write puts records into the other ring and ``send`` takes them
 * from it in place: no copies besides the cipher's own. The semantics are tlsleg's:
 * close_notify once when the plain side says EOF (SSL_shutdown called once never reads,
 * so records still coming in are not thrown away), the peer's close_notify becomes a
 * shutdown of the plain side's write half, and a TCP EOF without close_notify is an
 * error (the connection is reset by the caller). The GIL is released while bytes move.
 *
 * The SSL* and BIO* are read from CPython's ``_ssl`` objects (3.11 layout), and checked:
 * the SSL's rbio and wbio must be the memory BIOs' BIO*, else Engine() raises TypeError
 * and tlsleg keeps its Python pumps. Built by setuptools (pyproject.toml), linked to the
 * libssl that Python's ``_ssl`` uses; optional: without a compiler it is not built, and
 * tlsleg uses the Python pumps. Whether the libssl this module calls is the very one
 * Python's ``_ssl`` runs (a Python that links OpenSSL statically has its own copy, whose
 * structures this module must never touch) is asked once, by ``compiled.py``, through
 * ``same_libssl(path)``: the address ``SSL_get_rbio`` has for ``_ssl`` against ours.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* Sizes, measured (docs/performance.md, "Compiled pumps"): fewer and larger reads and
 * sends cost a relay less per byte. A TLS leg moves up to 512 KiB of plaintext per step
 * (32 records; against 256 KiB: 0.88x -> 0.81x HAProxy's CPU per Gbit), through rings of
 * CHUNK + 128 KiB each way (1.25 MiB per connection, allocated at its hand-over). A
 * plain copy reads up to 1 MiB at a time (0.95x -> 0.86x); a destination that did not
 * take all of the last one gets SLOW_CHUNK at a time until it takes a whole read again,
 * so what is kept for it stays small. */
#define CHUNK (512 * 1024)
#define RING (CHUNK + 128 * 1024)
#define COPY_CHUNK (1024 * 1024)
#define SLOW_CHUNK (256 * 1024)
#define SCRATCH (COPY_CHUNK > CHUNK ? COPY_CHUNK : CHUNK)

#define F_SRC_AGAIN 1   /* the source socket has nothing now */
#define F_DST_AGAIN 2   /* the destination socket is full */
#define F_EOF 4         /* encrypt: the plain side said EOF; decrypt: the peer's close_notify */
#define F_EMPTY 8       /* no ciphertext of ours waits for the TLS socket */

/* CPython 3.11's Modules/_ssl.c, as far as we read it. */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} SSLSocketHead;

typedef struct {
    PyObject_HEAD
    BIO *bio;
} MemoryBIOHead;

/* One of this module's types: its Name (Name_dealloc and Name_methods go with it), its doc,
 * and the slots it has besides (designated initializers). */
#define PUMP_TYPE(Name, doc, ...) {                    \
    PyVarObject_HEAD_INIT(NULL, 0)                      \
    .tp_name = "scistream.data.engine._pump." #Name,    \
    .tp_basicsize = sizeof(Name),                       \
    .tp_flags = Py_TPFLAGS_DEFAULT,                     \
    .tp_doc = doc,                                      \
    .tp_new = PyType_GenericNew,                        \
    .tp_dealloc = (destructor)Name##_dealloc,           \
    .tp_methods = Name##_methods,                       \
    __VA_ARGS__                                         \
}

static PyObject *SSLErrorType;
static __thread unsigned char *scratch;   /* SCRATCH bytes per thread: consumed before a call returns */

/* send (out) or recv with EINTR retried: the bytes moved (recv: 0 at EOF), NOT_NOW when the
 * socket is full or has nothing (EAGAIN), or -1 on an error (errno). */
#define NOT_NOW (-2)
#define io_send(fd, p, n) io_move(fd, (void *)(p), n, 1)
#define io_recv(fd, p, n) io_move(fd, p, n, 0)

static ssize_t io_move(int fd, void *p, size_t n, int out) {
    for (;;) {
        ssize_t s = out ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (s >= 0)
            return s;
        if (errno != EINTR)
            return errno == EAGAIN || errno == EWOULDBLOCK ? NOT_NOW : -1;
    }
}

/* Bytes a destination did not take, kept for the next call (copied: the scratch buffer is
 * the thread's). */
typedef struct {
    unsigned char *buf;
    size_t len, off, cap;
} Held;

/* Send what is held. 1: all of it went (a large buffer is given back); 0: the socket is
 * full; -1: error (errno). */
static int held_flush(Held *h, int fd, unsigned long long *moved) {
    while (h->len) {
        ssize_t s = io_send(fd, h->buf + h->off, h->len - h->off);
        if (s < 0)
            return s == NOT_NOW ? 0 : -1;
        *moved += (unsigned long long)s;
        h->off += (size_t)s;
        if (h->off < h->len)
            return 0;             /* a short send: the socket is full, EPOLLOUT will say when not */
        h->len = h->off = 0;
        if (h->cap > SLOW_CHUNK / 4) {   /* a burst is over: give the memory back */
            free(h->buf);
            h->buf = NULL;
            h->cap = 0;
        }
    }
    return 1;
}

/* Hold n bytes (in place of what was held). 0, or -1 with ENOMEM. */
static int hold(Held *h, const unsigned char *p, size_t n) {
    if (h->cap < n) {
        unsigned char *b = realloc(h->buf, n);
        if (b == NULL) {
            errno = ENOMEM;
            return -1;
        }
        h->buf = b;
        h->cap = n;
    }
    memcpy(h->buf, p, n);
    h->len = n;
    h->off = 0;
    return 0;
}

/* Send n bytes, hold what the socket does not take. 1: all sent; 0: some held (the socket
 * is full); -1: error (errno; ENOMEM if the rest could not be held). */
static int send_or_hold(Held *h, int fd, const unsigned char *p, size_t n, unsigned long long *moved) {
    ssize_t s = io_send(fd, p, n);
    if (s == -1)
        return -1;
    size_t off = s > 0 ? (size_t)s : 0;
    *moved += off;
    if (off == n)
        return 1;
    return hold(h, p + off, n - off);     /* a short send (or none): the socket is full */
}

/* A pump's first step: what it holds goes before anything new. 1: nothing is held (any
 * more), go on; 0: stop here (F_DST_AGAIN in *flags, or an error in *sys_err). */
static int held_first(Held *h, int fd, int writable, unsigned long long *moved, int *flags, int *sys_err) {
    if (!h->len)
        return 1;
    int r = writable ? held_flush(h, fd, moved) : 0;
    if (r < 0)
        *sys_err = errno;
    else if (r == 0)
        *flags |= F_DST_AGAIN;
    return r > 0;
}

/* The exception being raised carries ``moved``: the bytes a pump call moved before it
 * failed (a reset usually ends a call that moved megabytes; they must still be counted).
 * Returns NULL, for ``return with_moved(...)``. */
static PyObject *with_moved(unsigned long long moved) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL) {
        PyObject *n = PyLong_FromUnsignedLongLong(moved);
        if (n == NULL || PyObject_SetAttrString(value, "moved", n) < 0)
            PyErr_Clear();    /* the count is lost, the error is not */
        Py_XDECREF(n);
    }
    PyErr_Restore(type, value, tb);
    return NULL;
}

/* What a pump call returns: (bytes moved, flags), or OSError (with ``moved``). */
static PyObject *pump_result(unsigned long long moved, int flags, int sys_err) {
    if (sys_err) {
        errno = sys_err;
        PyErr_SetFromErrno(PyExc_OSError);
        return with_moved(moved);
    }
    return Py_BuildValue("Ki", moved, flags);
}

typedef struct {
    PyObject_HEAD
    PyObject *owner;             /* the _ssl._SSLSocket that owns the SSL* (and frees it) */
    SSL *ssl;
    BIO *ext;                    /* our end of the pair */
    Held pre;                    /* ciphertext queued before the swap, sent first */
    Held left;                   /* decrypted plaintext the plain socket did not take yet */
    int tls_eof;                 /* TCP EOF on the TLS socket */
    int peer_closed;             /* the peer's close_notify arrived */
    int shut;                    /* 0: not asked; 1: close_notify owed (ring was full); 2: queued */
} Engine;

static unsigned char *thread_scratch(void) {
    if (scratch == NULL)
        scratch = malloc(SCRATCH);
    return scratch;
}

/* After an OpenSSL failure: raise ssl.SSLError with OpenSSL's reason (or the socket's errno). */
static PyObject *raise_ssl(unsigned long code, int sys_errno, const char *fallback) {
    const char *msg = code ? ERR_reason_error_string(code) : NULL;
    if (msg == NULL)
        msg = sys_errno ? strerror(sys_errno) : fallback;
    PyObject *exc = PyObject_CallFunction(SSLErrorType, "is", 1, msg);
    if (exc == NULL)
        return NULL;
    PyObject *text = PyUnicode_FromString(msg);
    if (text != NULL) {
        PyObject_SetAttrString(exc, "reason", text);
        PyObject_SetAttrString(exc, "library", Py_None);
        Py_DECREF(text);
    }
    PyErr_SetObject(SSLErrorType, exc);
    Py_DECREF(exc);
    return NULL;
}

/* Send what waits for the TLS socket: the bytes from before the swap, then the ring.
 * 1: all sent; 0: the socket is full (*writable cleared; NULL: try it); -1: error (errno). */
static int flush_out(Engine *e, int fd, int *writable) {
    unsigned long long sent = 0;   /* ciphertext: not counted */
    int w = writable == NULL || *writable;
    int r = !e->pre.len ? 1 : w ? held_flush(&e->pre, fd, &sent) : 0;
    while (r > 0) {
        char *p;
        int n = BIO_nread0(e->ext, &p);
        if (n <= 0)
            break;
        ssize_t s = w ? io_send(fd, p, (size_t)n) : 0;
        if (s == -1)
            return -1;
        if (s > 0)
            BIO_nread(e->ext, &p, (int)s);
        if (s < n)                 /* none or a short send: the socket is full */
            r = 0;
    }
    if (r == 0 && writable != NULL)
        *writable = 0;
    return r;
}

static int out_empty(Engine *e) {
    return e->pre.len == 0 && BIO_ctrl_pending(e->ext) == 0;
}

/* SSL_shutdown once; again only if the first could not queue its alert (the ring was
 * full): a second call after a queued alert would read, and discard, records. */
static int try_shutdown(Engine *e) {
    ERR_clear_error();
    int r = SSL_shutdown(e->ssl);
    if (r < 0 && SSL_get_error(e->ssl, r) != SSL_ERROR_WANT_WRITE)
        return -1;
    e->shut = r >= 0 ? 2 : 1;
    return 0;
}

static PyObject *Engine_encrypt(Engine *e, PyObject *args) {
    int src, dst, readable, writable;
    if (!PyArg_ParseTuple(args, "iipp", &src, &dst, &readable, &writable))
        return NULL;
    unsigned long long moved = 0;
    int flags = 0, sys_err = 0, ssl_fail = 0;
    unsigned long code = 0;
    Py_BEGIN_ALLOW_THREADS
    unsigned char *buf = thread_scratch();
    if (buf == NULL) {
        sys_err = ENOMEM;
    } else {
        for (;;) {
            int f = flush_out(e, dst, &writable);
            if (f < 0) {
                sys_err = errno;
                break;
            }
            if (f == 0) {
                flags |= F_DST_AGAIN;
                break;
            }
            if (e->shut == 1) {
                if (try_shutdown(e) < 0) {
                    ssl_fail = 1;
                    code = ERR_peek_last_error();
                    break;
                }
                continue;
            }
            if (e->shut || !readable)
                break;
            /* The ring is empty: CHUNK of plaintext fits, with its records' overhead. */
            ssize_t n = io_recv(src, buf, CHUNK);
            if (n <= 0) {
                if (n == NOT_NOW)
                    flags |= F_SRC_AGAIN;
                else if (n == 0)
                    flags |= F_EOF;
                else
                    sys_err = errno;
                break;
            }
            ERR_clear_error();
            int r = SSL_write(e->ssl, buf, (int)n);
            if (r != (int)n) {
                ssl_fail = 1;
                code = ERR_peek_last_error();
                break;
            }
            moved += (unsigned long long)n;
        }
    }
    Py_END_ALLOW_THREADS
    if (ssl_fail) {
        (void)flush_out(e, dst, &writable);   /* best effort: an alert, not just a reset */
        ERR_clear_error();
        raise_ssl(code, 0, "TLS write failed");
        return with_moved(moved);
    }
    if (!sys_err && out_empty(e))
        flags |= F_EMPTY;
    return pump_result(moved, flags, sys_err);
}

static PyObject *Engine_decrypt(Engine *e, PyObject *args) {
    int src, dst, readable, writable;
    if (!PyArg_ParseTuple(args, "iipp", &src, &dst, &readable, &writable))
        return NULL;
    unsigned long long moved = 0;
    int flags = 0, sys_err = 0, ssl_fail = 0, ssl_errno = 0;
    unsigned long code = 0;
    Py_BEGIN_ALLOW_THREADS
    unsigned char *buf = thread_scratch();
    if (buf == NULL)
        sys_err = ENOMEM;
    while (buf != NULL) {
        if (!held_first(&e->left, dst, writable, &moved, &flags, &sys_err))
            break;
        if (e->peer_closed) {
            flags |= F_EOF;
            break;
        }
        if (!writable) {
            flags |= F_DST_AGAIN;
            break;
        }
        size_t got = 0;
        int src_again = 0;
        while (got < CHUNK) {
            ERR_clear_error();
            int r = SSL_read(e->ssl, buf + got, (int)(CHUNK - got));
            if (r > 0) {
                got += (size_t)r;
                continue;
            }
            int ge = SSL_get_error(e->ssl, r);
            if (ge == SSL_ERROR_ZERO_RETURN) {
                if (!(SSL_get_shutdown(e->ssl) & SSL_RECEIVED_SHUTDOWN)) {
                    /* a TCP EOF taken for a close (SSL_OP_IGNORE_UNEXPECTED_EOF): a truncation */
                    ssl_fail = 1;
                    goto done;
                }
                e->peer_closed = 1;
                break;
            }
            if (ge == SSL_ERROR_WANT_WRITE) {   /* a reply (key update) waits on a full ring */
                int f = flush_out(e, src, NULL);
                if (f < 0) {
                    sys_err = errno;
                    goto done;
                }
                if (f == 0)
                    break;
                continue;
            }
            if (ge != SSL_ERROR_WANT_READ) {
                ssl_fail = 1;
                code = ERR_peek_last_error();
                ssl_errno = ge == SSL_ERROR_SYSCALL ? errno : 0;
                goto done;
            }
            if (!readable) {
                src_again = 1;
                break;
            }
            char *p;
            int room = BIO_nwrite0(e->ext, &p);
            if (room <= 0)
                break;   /* cannot happen: the ring holds more than a record */
            ssize_t n = io_recv(src, p, (size_t)room);
            if (n > 0) {
                BIO_nwrite(e->ext, &p, (int)n);
            } else if (n == 0) {
                e->tls_eof = 1;         /* SSL_read now fails unless close_notify came first */
                BIO_shutdown_wr(e->ext);
            } else if (n == NOT_NOW) {
                src_again = 1;
                readable = 0;
                break;
            } else {
                sys_err = errno;
                goto done;
            }
        }
        if (got) {
            int r = send_or_hold(&e->left, dst, buf, got, &moved);
            if (r < 0) {
                sys_err = errno;
                goto done;
            }
            if (r == 0) {
                writable = 0;
                flags |= F_DST_AGAIN;
                break;
            }
            if (src_again && !e->peer_closed) {
                flags |= F_SRC_AGAIN;
                break;
            }
            continue;
        }
        if (e->peer_closed)
            continue;
        if (src_again)
            flags |= F_SRC_AGAIN;
        break;
    }
done:
    /* Anything the engine has to say on the TLS socket (alerts, key update replies). */
    if (!sys_err && !ssl_fail && BIO_ctrl_pending(e->ext) > 0 && flush_out(e, src, NULL) < 0)
        sys_err = errno;
    Py_END_ALLOW_THREADS
    if (ssl_fail) {
        (void)flush_out(e, src, NULL);
        ERR_clear_error();
        raise_ssl(code, ssl_errno, e->tls_eof ? "EOF in violation of protocol" : "TLS read failed");
        return with_moved(moved);
    }
    return pump_result(moved, flags, sys_err);
}

static PyObject *Engine_shutdown(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->shut)
        Py_RETURN_NONE;
    if (try_shutdown(e) < 0) {
        unsigned long code = ERR_peek_last_error();
        ERR_clear_error();
        return raise_ssl(code, 0, "close_notify failed");
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_get_pending(Engine *e, void *Py_UNUSED(closure)) {
    size_t n = BIO_ctrl_pending(e->ext) + (e->pre.len - e->pre.off);
    return PyLong_FromSize_t(n);
}

/* The bytes a Held (at offset ``closure`` in the object) still has for its socket. */
static PyObject *get_held(PyObject *o, void *closure) {
    Held *h = (Held *)((char *)o + (size_t)closure);
    return PyLong_FromSize_t(h->len - h->off);
}

/* The SSL* of an _ssl._SSLSocket, checked against its two memory BIOs (the SSL's rbio and
 * wbio must be theirs: this Python's _ssl is laid out as we read it); NULL with TypeError. */
static SSL *checked_ssl(PyObject *sslobj, PyObject *inc, PyObject *out) {
    if (strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0 ||
        strcmp(Py_TYPE(inc)->tp_name, "_ssl.MemoryBIO") != 0 ||
        strcmp(Py_TYPE(out)->tp_name, "_ssl.MemoryBIO") != 0) {
        PyErr_SetString(PyExc_TypeError, "need an _ssl._SSLSocket and its two _ssl.MemoryBIO");
        return NULL;
    }
    SSL *ssl = ((SSLSocketHead *)sslobj)->ssl;
    BIO *rb = ((MemoryBIOHead *)inc)->bio, *wb = ((MemoryBIOHead *)out)->bio;
    if (ssl == NULL || rb == NULL || wb == NULL || SSL_get_rbio(ssl) != rb || SSL_get_wbio(ssl) != wb) {
        PyErr_SetString(PyExc_TypeError, "this Python's _ssl objects are not laid out as expected");
        return NULL;
    }
    return ssl;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"sslobj", "inc", "out", "pending_in", "pending_out", "eof_in", NULL};
    PyObject *sslobj, *inc, *out;
    Py_buffer pin, pout;
    int eof_in = 0;
    if (e->ssl != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOy*y*|p", kwlist, &sslobj, &inc, &out, &pin, &pout, &eof_in))
        return -1;
    int rc = -1;
    SSL *ssl = checked_ssl(sslobj, inc, out);
    if (ssl == NULL)
        goto out;
    BIO *rb = SSL_get_rbio(ssl), *wb = SSL_get_wbio(ssl);
    if (!SSL_is_init_finished(ssl)) {
        PyErr_SetString(PyExc_ValueError, "the handshake is not complete");
        goto out;
    }
    if (BIO_ctrl_pending(rb) != 0 || BIO_ctrl_pending(wb) != 0) {
        PyErr_SetString(PyExc_ValueError, "read the memory BIOs into pending_in and pending_out first");
        goto out;
    }
    if ((size_t)pin.len > RING) {
        PyErr_SetString(PyExc_ValueError, "pending_in is larger than the ring");
        goto out;
    }
    if (pout.len > 0 && hold(&e->pre, pout.buf, (size_t)pout.len) < 0) {   /* freed with e */
        PyErr_NoMemory();
        goto out;
    }
    BIO *inner = NULL, *ext = NULL;
    if (BIO_new_bio_pair(&inner, RING, &ext, RING) != 1) {
        ERR_clear_error();
        PyErr_NoMemory();
        goto out;
    }
    if (pin.len > 0 && BIO_write(ext, pin.buf, (int)pin.len) != (int)pin.len) {
        BIO_free(inner);
        BIO_free(ext);
        ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "cannot move pending ciphertext into the BIO pair");
        goto out;
    }
    if (eof_in) {
        e->tls_eof = 1;
        BIO_shutdown_wr(ext);
    }
    SSL_set_bio(ssl, inner, inner);   /* drops the SSL's references to the memory BIOs */
    e->ssl = ssl;
    e->ext = ext;
    Py_INCREF(sslobj);
    e->owner = sslobj;
    rc = 0;
out:
    PyBuffer_Release(&pin);
    PyBuffer_Release(&pout);
    return rc;
}

static void Engine_dealloc(Engine *e) {
    if (e->ext != NULL)
        BIO_free(e->ext);
    free(e->pre.buf);
    free(e->left.buf);
    Py_XDECREF(e->owner);     /* its SSL_free frees the pair's other half */
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* A plain pump that copies: recv into the thread's buffer, send; what the destination did
 * not take is kept (``unsent``) and goes first next time. ``relay.CopyPump`` in C. */
typedef struct {
    PyObject_HEAD
    Held left;
    int slow;                    /* the destination did not take a whole read: read SLOW_CHUNK */
} Copier;

/* One call of a copying pump, without the interpreter (the GIL may be released): moves
 * src -> dst until a socket says EAGAIN, EOF or an error; adds to *moved, ORs F_* into
 * *flags, an errno into *sys_err. */
static void copier_step(Copier *c, int src, int dst, int readable, int writable,
                        unsigned long long *moved, int *flags, int *sys_err) {
    unsigned char *buf = thread_scratch();
    if (buf == NULL)
        *sys_err = ENOMEM;
    while (buf != NULL) {
        if (!held_first(&c->left, dst, writable, moved, flags, sys_err))
            break;
        if (!readable) {
            *flags |= F_SRC_AGAIN;
            break;
        }
        if (!writable) {
            *flags |= F_DST_AGAIN;
            break;
        }
        ssize_t n = io_recv(src, buf, c->slow ? SLOW_CHUNK : COPY_CHUNK);
        if (n <= 0) {
            if (n == NOT_NOW)
                *flags |= F_SRC_AGAIN;
            else if (n == 0)
                *flags |= F_EOF;
            else
                *sys_err = errno;
            break;
        }
        int r = send_or_hold(&c->left, dst, buf, (size_t)n, moved);
        if (r < 0) {
            *sys_err = errno;
            break;
        }
        c->slow = r == 0;
        if (r == 0) {
            writable = 0;
            *flags |= F_DST_AGAIN;
            break;
        }
    }
}

static PyObject *Copier_copy(Copier *c, PyObject *args) {
    int src, dst, readable, writable;
    if (!PyArg_ParseTuple(args, "iipp", &src, &dst, &readable, &writable))
        return NULL;
    unsigned long long moved = 0;
    int flags = 0, sys_err = 0;
    Py_BEGIN_ALLOW_THREADS
    copier_step(c, src, dst, readable, writable, &moved, &flags, &sys_err);
    Py_END_ALLOW_THREADS
    return pump_result(moved, flags, sys_err);
}

static void Copier_dealloc(Copier *c) {
    free(c->left.buf);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Copier_methods[] = {
    {"copy", (PyCFunction)Copier_copy, METH_VARARGS,
     "copy(src_fd, dst_fd, readable, writable) -> (bytes sent, flags)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Copier_getset[] = {
    {"unsent", get_held, NULL, "bytes waiting for the destination", (void *)offsetof(Copier, left)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CopierType = PUMP_TYPE(
    Copier, "One direction of a plain leg that copies (see the module's doc).",
    .tp_getset = Copier_getset);

/* The event loop's wait, with the plain copying connections carried in C (``Hub``).
 *
 * A node worker spends its life in epoll_wait and in the pumps of its established plain
 * connections; between the two, the interpreter dispatched every event (the loop, the
 * connection's handler, the pump object), about a fifth of a relay's CPU time on one
 * stream (docs/performance.md, "Events carried in C"). A connection whose two directions
 * are ``Copier``s is attached here once it is open: its events are handled in this wait
 * (note readable / writable, run both copiers), and only what needs the interpreter
 * comes back: events of every other descriptor, and an attached connection's end (a
 * hang-up, an error event, EOF, a failed call), which is handed over with the event that
 * showed it, the connection then marked so that Python detaches it and goes on as before.
 * Bytes moved are kept per connection until Python takes them (``take``, ``detach``).
 *
 * The spin before a sleep (evloop.Loop._wait_spinning) is here as well: while the recent
 * waits ended within ``spin`` seconds, poll without sleeping (sched_yield between) for up
 * to ``spin``, never past the timeout, and stop at a yield that took longer than
 * ``give_way`` (it ran another task: the core is wanted). */

#define EV_END (EPOLLHUP | EPOLLERR | EPOLLRDHUP)

typedef struct {
    Copier *cp[2];                  /* cp[0]: fd[0] -> fd[1] ("in"), cp[1]: fd[1] -> fd[0] */
    int fd[2];
    int readable[2], writable[2];
    unsigned long long moved[2];    /* per direction, not yet taken */
    int err;                        /* errno of a failed call: Python aborts the connection */
    int ended;                      /* handed to Python: its events pass through */
} Fast;

typedef struct {
    PyObject_HEAD
    int epfd;
    Fast **tab;                     /* fd -> its connection, for both fds of each */
    int cap;
    int attached;
    double spin, give_way;
    int recent, score;              /* waits within the spin, and how many make it spin on each */
    unsigned long long hits, missed, gave_way, carried;
    struct epoll_event *evs;        /* a wait's events; those for Python moved to its front */
    int nevs;
} Hub;

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int Hub_init(Hub *h, PyObject *args, PyObject *kw) {
    static char *names[] = {"epfd", "spin", "give_way", "score", NULL};
    int epfd, score = 4;
    double spin = 0.0, give_way = 20e-6;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|ddi", names, &epfd, &spin, &give_way, &score))
        return -1;
    h->epfd = epfd;
    h->spin = spin > 0 ? spin : 0.0;
    h->give_way = give_way;
    h->score = score > 0 ? score : 1;
    return 0;
}

/* Forget an attached connection: both descriptors, its copiers, its memory. */
static void hub_remove(Hub *h, Fast *f) {
    h->tab[f->fd[0]] = h->tab[f->fd[1]] = NULL;
    h->attached--;
    Py_DECREF(f->cp[0]);
    Py_DECREF(f->cp[1]);
    free(f);
}

static void Hub_dealloc(Hub *h) {
    for (int fd = 0; fd < h->cap; fd++)
        if (h->tab[fd] != NULL)
            hub_remove(h, h->tab[fd]);
    free(h->tab);
    free(h->evs);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static Fast *hub_get(Hub *h, int fd) {
    return fd >= 0 && fd < h->cap ? h->tab[fd] : NULL;
}

/* The connection attached under its first descriptor, the call's one argument; or NULL
 * with KeyError. */
static Fast *hub_arg(Hub *h, PyObject *args) {
    int fa;
    if (!PyArg_ParseTuple(args, "i", &fa))
        return NULL;
    Fast *f = hub_get(h, fa);
    if (f == NULL || f->fd[0] != fa) {
        PyErr_SetString(PyExc_KeyError, "not attached");
        return NULL;
    }
    return f;
}

static PyObject *Hub_attach(Hub *h, PyObject *args) {
    int fa, fb, ra, wa, rb, wb;
    PyObject *ci, *co;
    if (!PyArg_ParseTuple(args, "iiO!O!pppp", &fa, &fb, &CopierType, &ci, &CopierType, &co, &ra, &wa, &rb, &wb))
        return NULL;
    if (fa < 0 || fb < 0 || fa == fb) {
        PyErr_SetString(PyExc_ValueError, "two different open descriptors wanted");
        return NULL;
    }
    if (hub_get(h, fa) != NULL || hub_get(h, fb) != NULL) {
        PyErr_SetString(PyExc_ValueError, "descriptor already attached");
        return NULL;
    }
    int need = (fa > fb ? fa : fb) + 1;
    if (need > h->cap) {
        int cap = h->cap ? h->cap : 256;
        while (cap < need)
            cap *= 2;
        Fast **t = realloc(h->tab, sizeof(Fast *) * (size_t)cap);
        if (t == NULL)
            return PyErr_NoMemory();
        memset(t + h->cap, 0, sizeof(Fast *) * (size_t)(cap - h->cap));
        h->tab = t;
        h->cap = cap;
    }
    Fast *f = calloc(1, sizeof(Fast));
    if (f == NULL)
        return PyErr_NoMemory();
    Py_INCREF(ci);
    Py_INCREF(co);
    f->cp[0] = (Copier *)ci;
    f->cp[1] = (Copier *)co;
    f->fd[0] = fa;
    f->fd[1] = fb;
    f->readable[0] = ra;
    f->writable[0] = wa;
    f->readable[1] = rb;
    f->writable[1] = wb;
    h->tab[fa] = h->tab[fb] = f;
    h->attached++;
    Py_RETURN_NONE;
}

static PyObject *Hub_detach(Hub *h, PyObject *args) {
    Fast *f = hub_arg(h, args);
    if (f == NULL)
        return NULL;
    PyObject *r = Py_BuildValue("KKiiiii", f->moved[0], f->moved[1], f->readable[0], f->writable[0],
                                f->readable[1], f->writable[1], f->err);
    if (r != NULL)
        hub_remove(h, f);
    return r;
}

static PyObject *Hub_take(Hub *h, PyObject *args) {
    Fast *f = hub_arg(h, args);
    if (f == NULL)
        return NULL;
    PyObject *r = Py_BuildValue("KK", f->moved[0], f->moved[1]);
    f->moved[0] = f->moved[1] = 0;
    return r;
}

/* An event of an attached connection, in C: 1 if Python must see it. */
static int hub_carry(Hub *h, Fast *f, int fd, unsigned int ev) {
    if (f->ended)
        return 1;
    if (ev & EV_END) {                /* its end, or an error: Python's, untouched */
        f->ended = 1;
        return 1;
    }
    int i = f->fd[0] == fd ? 0 : 1;
    if (ev & EPOLLIN)
        f->readable[i] = 1;
    if (ev & EPOLLOUT)
        f->writable[i] = 1;
    for (int d = 0; d < 2; d++) {
        int s = d, t = 1 - d, flags = 0, err = 0;
        copier_step(f->cp[d], f->fd[s], f->fd[t], f->readable[s], f->writable[t], &f->moved[d], &flags, &err);
        if (flags & F_SRC_AGAIN)
            f->readable[s] = 0;
        if (flags & F_DST_AGAIN)
            f->writable[t] = 0;
        if (err || (flags & F_EOF)) {  /* EOF is said again by the next recv: Python's now */
            f->err = err;
            f->ended = 1;
            return 1;
        }
    }
    h->carried++;
    return 0;
}

/* epoll_wait, with the spin first while the recent waits were short. */
static int hub_epoll(Hub *h, int timeout_ms, double deadline) {
    double start = mono();
    int n = 0;
    if (h->spin > 0 && h->recent > 0 && timeout_ms != 0) {
        double end = start + h->spin, t = start;
        if (deadline > 0 && deadline < end)
            end = deadline;
        while ((n = epoll_wait(h->epfd, h->evs, h->nevs, 0)) == 0) {
            sched_yield();
            double before = t;
            t = mono();
            if (t - before > h->give_way) {
                h->gave_way++;
                h->recent = 0;
                break;
            }
            if (t >= end) {
                h->missed++;
                break;
            }
        }
        if (n > 0)
            h->hits++;
        else if (n < 0)
            return n;
    }
    if (n == 0)
        n = epoll_wait(h->epfd, h->evs, h->nevs, timeout_ms);
    if (h->spin > 0) {
        if (n > 0 && mono() - start < h->spin) {
            if (h->recent < h->score)
                h->recent++;
        } else if (h->recent > 0) {
            h->recent--;
        }
    }
    return n;
}

static PyObject *Hub_wait(Hub *h, PyObject *args) {
    double timeout = -1.0;
    int maxevents = 1024;
    if (!PyArg_ParseTuple(args, "|di", &timeout, &maxevents))
        return NULL;
    if (maxevents < 1)
        maxevents = 1;
    if (maxevents > h->nevs) {
        struct epoll_event *e = realloc(h->evs, sizeof(*e) * (size_t)maxevents);
        if (e == NULL)
            return PyErr_NoMemory();
        h->evs = e;
        h->nevs = maxevents;
    }
    int nout = 0, sys_err = 0;
    Py_BEGIN_ALLOW_THREADS
    double deadline = timeout >= 0 ? mono() + timeout : -1.0;
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - mono();
            ms = left <= 0 ? 0 : (int)(left * 1000.0 + 0.999999);   /* rounded up, as epoll.poll */
        }
        int n = hub_epoll(h, ms, deadline);
        if (n < 0) {
            sys_err = errno;
            break;
        }
        for (int k = 0; k < n; k++) {
            int fd = h->evs[k].data.fd;
            Fast *f = hub_get(h, fd);
            if (f == NULL || hub_carry(h, f, fd, h->evs[k].events))
                h->evs[nout++] = h->evs[k];     /* nout <= k: nothing unread is overwritten */
        }
        if (nout || ms == 0)
            break;
    }
    Py_END_ALLOW_THREADS
    if (sys_err) {
        if (sys_err == EINTR) {               /* a signal: its handler runs now (PEP 475) */
            if (PyErr_CheckSignals() < 0)
                return NULL;
        } else {
            errno = sys_err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    PyObject *list = PyList_New(nout);
    if (list == NULL)
        return NULL;
    for (int k = 0; k < nout; k++) {
        PyObject *item = Py_BuildValue("iI", h->evs[k].data.fd, h->evs[k].events);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

static PyMethodDef Hub_methods[] = {
    {"attach", (PyCFunction)Hub_attach, METH_VARARGS,
     "attach(fd_a, fd_b, copier_in, copier_out, a_readable, a_writable, b_readable, b_writable)"},
    {"detach", (PyCFunction)Hub_detach, METH_VARARGS,
     "detach(fd_a) -> (moved_in, moved_out, a_readable, a_writable, b_readable, b_writable, errno)"},
    {"take", (PyCFunction)Hub_take, METH_VARARGS, "take(fd_a) -> (moved_in, moved_out) since the last take"},
    {"wait", (PyCFunction)Hub_wait, METH_VARARGS,
     "wait(timeout=-1, maxevents=1024) -> [(fd, events)] for Python (epoll.poll's)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Hub_members[] = {
    {"spin", T_DOUBLE, offsetof(Hub, spin), 0, "seconds a wait may spin before it sleeps"},
    {"give_way", T_DOUBLE, offsetof(Hub, give_way), 0, "a yield longer than this ends the spin"},
    {"spin_hits", T_ULONGLONG, offsetof(Hub, hits), READONLY, "spins that met an event"},
    {"spin_missed", T_ULONGLONG, offsetof(Hub, missed), READONLY, "spins that ran out"},
    {"spin_gave_way", T_ULONGLONG, offsetof(Hub, gave_way), READONLY, "spins ended by a long yield"},
    {"carried", T_ULONGLONG, offsetof(Hub, carried), READONLY, "events handled without Python"},
    {"attached", T_INT, offsetof(Hub, attached), READONLY, "connections attached"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HubType = PUMP_TYPE(
    Hub, "The event loop's wait with plain copying connections carried in C (see above).",
    .tp_init = (initproc)Hub_init, .tp_members = Hub_members);

static PyMethodDef Engine_methods[] = {
    {"encrypt", (PyCFunction)Engine_encrypt, METH_VARARGS,
     "encrypt(plain_fd, tls_fd, readable, writable) -> (plaintext bytes moved, flags)"},
    {"decrypt", (PyCFunction)Engine_decrypt, METH_VARARGS,
     "decrypt(tls_fd, plain_fd, readable, writable) -> (plaintext bytes moved, flags)"},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS, "queue close_notify (once)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"pending", (getter)Engine_get_pending, NULL, "ciphertext bytes waiting for the TLS socket", NULL},
    {"unsent", get_held, NULL, "plaintext bytes waiting for the plain socket",
     (void *)offsetof(Engine, left)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = PUMP_TYPE(
    Engine, "The TLS engine of one connection after its handshake (see the module's doc).",
    .tp_init = (initproc)Engine_init, .tp_getset = Engine_getset);

/* set_ticket_keys(sslobj, inc, out, keys): the session-ticket keys (80 bytes: name, HMAC
 * secret, AES key) of the SSL_CTX behind an SSLObject of that context, so that every
 * process that derives the same keys (a session's workers, its nodes) resumes the
 * others' tickets. The SSL* is checked as Engine() checks it (its BIOs must be the
 * SSLObject's memory BIOs) before its SSL_CTX is touched. */
static PyObject *set_ticket_keys(PyObject *self, PyObject *args) {
    PyObject *sslobj, *inc, *out;
    Py_buffer keys;
    if (!PyArg_ParseTuple(args, "OOOy*", &sslobj, &inc, &out, &keys))
        return NULL;
    PyObject *res = NULL;
    unsigned char back[80];
    if (keys.len != (Py_ssize_t)sizeof back) {
        PyErr_SetString(PyExc_ValueError, "ticket keys are 80 bytes");
        goto out;
    }
    SSL *ssl = checked_ssl(sslobj, inc, out);
    if (ssl == NULL)
        goto out;
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    if (ctx == NULL || SSL_CTX_set_tlsext_ticket_keys(ctx, keys.buf, sizeof back) != 1 ||
        SSL_CTX_get_tlsext_ticket_keys(ctx, back, sizeof back) != 1 || memcmp(back, keys.buf, sizeof back) != 0) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ValueError, "the context did not take the ticket keys");
        goto out;
    }
    res = Py_None;
    Py_INCREF(res);
out:
    PyBuffer_Release(&keys);
    return res;
}

/* set_groups(sslobj, inc, out, "X25519:P-256:P-384"): the key exchange groups of the SSL_CTX
 * behind an SSLObject of that context (Python 3.11 sets one group at most: set_ecdh_curve);
 * the SSL* is checked as for the ticket keys. */
static PyObject *set_groups(PyObject *self, PyObject *args) {
    PyObject *sslobj, *inc, *out;
    const char *groups;
    if (!PyArg_ParseTuple(args, "OOOs", &sslobj, &inc, &out, &groups))
        return NULL;
    SSL *ssl = checked_ssl(sslobj, inc, out);
    if (ssl == NULL)
        return NULL;
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    if (ctx == NULL || SSL_CTX_set1_groups_list(ctx, groups) != 1) {
        ERR_clear_error();
        PyErr_Format(PyExc_ValueError, "OpenSSL refuses the groups %s", groups);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* same_libssl(path or None) -> (same, OpenSSL_version_num of ours): whether the object at
 * path (Python's _ssl extension; None: the main program, where a static Python keeps it)
 * resolves SSL_get_rbio to the very function this module calls. */
static PyObject *same_libssl(PyObject *self, PyObject *args) {
    const char *path = NULL;
    if (!PyArg_ParseTuple(args, "z", &path))
        return NULL;
    int same = 0;
    void *h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (h != NULL) {
        void *theirs = dlsym(h, "SSL_get_rbio");
        same = theirs != NULL && theirs == (void *)&SSL_get_rbio;
        dlclose(h);
    }
    return Py_BuildValue("(OK)", same ? Py_True : Py_False, (unsigned long long)OpenSSL_version_num());
}

/* ---- UDP: the built-in type's datagram relay (``engine.udp``), batched, and its AEAD ------
 *
 * ``UdpDir(key, epoch, sending)``: one direction of one flow of ``engine.udpseal`` (AES-256-GCM
 * through libcrypto's EVP, the key schedule made once): the sending counter, or the
 * receiving replay window (``WINDOW`` counters, a ring of bits: counter c at bit c mod
 * WINDOW). udpseal's Sealer uses it as its Python ``Direction`` (same methods), so a
 * compiled and a Python gateway speak the same bytes.
 *
 *     d.seal(head, ctr, data) -> ciphertext + tag      d.open(head, ctr, body) -> plain or None
 *     d.replayed(ctr) -> bool                          d.accept(ctr)
 *
 * ``udp_pass(...)``: what ``UdpRelay`` does for one readiness event of one UDP socket,
 * with one ``recvmmsg`` (up to UDP_BATCH datagrams) and the sends in runs (UDP GSO: one
 * ``sendmsg`` a run; else ``sendmmsg``). Datagrams it cannot finish here (a source with no
 * flow yet, another flow id, a new epoch, a rekey due) are given back, in order, for the
 * Python path; once a flow has one given back, the rest of its datagrams in the batch are
 * too, so a flow's datagrams keep their order and its state moves as in Python. */
#include <netinet/in.h>
#include <arpa/inet.h>
#include <openssl/evp.h>
#include <stdint.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define UDP_BATCH 64
#define UDP_HEAD 23              /* version(1) tag(4) flow id(8) epoch(2) counter(8) */
#define UDP_TAG 16
#define UDP_OVERHEAD (UDP_HEAD + UDP_TAG)
#define UDP_MAX 65535
#define UDP_SLOT (UDP_HEAD + UDP_MAX + UDP_TAG + 8)
#define UDP_WINDOW 4096
#define UDP_WORDS (UDP_WINDOW / 64)
#define UDP_VERSION 1
#define UDP_IP_UDP 28
#define GSO_SEGMENTS 64
#define GSO_BYTES 60000
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define UDP_OUTS (UDP_BATCH * 128)   /* datagrams in one batch: GRO runs hold at most 64 (128) */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    int sending;
    unsigned int epoch;
    unsigned long long counter;  /* sending: the next counter */
    long long top;               /* receiving: the highest counter accepted, -1: none */
    uint64_t seen[UDP_WORDS];
} UdpDir;

static int UdpDir_init(UdpDir *d, PyObject *args, PyObject *kw) {
    static char *names[] = {"key", "epoch", "sending", NULL};
    Py_buffer key;
    unsigned int epoch;
    int sending;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*Ip", names, &key, &epoch, &sending))
        return -1;
    if (key.len != 32) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "UdpDir: the key is 32 bytes");
        return -1;
    }
    if (d->ctx == NULL)
        d->ctx = EVP_CIPHER_CTX_new();
    int ok = d->ctx != NULL &&
             EVP_CipherInit_ex(d->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL, sending) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "UdpDir: libcrypto refused AES-256-GCM");
        return -1;
    }
    d->sending = sending;
    d->epoch = epoch & 0xFFFF;
    d->counter = 0;
    d->top = -1;
    memset(d->seen, 0, sizeof d->seen);
    return 0;
}

static void UdpDir_dealloc(UdpDir *d) {
    if (d->ctx != NULL)
        EVP_CIPHER_CTX_free(d->ctx);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* A counter's 8 bytes, big-endian, at p. */
static void put_ctr(unsigned char *p, unsigned long long ctr) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(ctr >> (56 - 8 * i));
}

/* In place, the way the direction goes: seal n bytes at p, the tag written at p + n; or open
 * n bytes of ciphertext at p, its tag at p + n. 1: done (opening: it authenticated). */
static int dir_crypt(UdpDir *d, const unsigned char *head, unsigned long long ctr, unsigned char *p, int n) {
    unsigned char iv[12] = {0};
    int len;
    put_ctr(iv + 4, ctr);
    if (EVP_CipherInit_ex(d->ctx, NULL, NULL, NULL, iv, -1) != 1 ||
        EVP_CipherUpdate(d->ctx, NULL, &len, head, UDP_HEAD) != 1 ||
        (n > 0 && EVP_CipherUpdate(d->ctx, p, &len, p, n) != 1) ||
        (!d->sending && EVP_CIPHER_CTX_ctrl(d->ctx, EVP_CTRL_GCM_SET_TAG, UDP_TAG, p + n) != 1) ||
        EVP_CipherFinal_ex(d->ctx, p + n, &len) != 1)
        return 0;
    return !d->sending || EVP_CIPHER_CTX_ctrl(d->ctx, EVP_CTRL_GCM_GET_TAG, UDP_TAG, p + n) == 1;
}

/* Counter c's bit in the window: its word, and its mask in that word. */
#define SEEN_WORD(d, c) ((d)->seen[(c) % UDP_WINDOW / 64])
#define SEEN_BIT(c) ((uint64_t)1 << ((c) % 64))

/* As udpseal: older than the window, or seen in it. */
static int dir_replayed(const UdpDir *d, unsigned long long ctr) {
    if (d->top < 0)
        return 0;
    unsigned long long top = (unsigned long long)d->top;
    if (top >= UDP_WINDOW && ctr <= top - UDP_WINDOW)
        return 1;
    return ctr <= top && (SEEN_WORD(d, ctr) & SEEN_BIT(ctr)) != 0;
}

static void dir_accept(UdpDir *d, unsigned long long ctr) {
    if (d->top < 0 || ctr > (unsigned long long)d->top) {
        unsigned long long from = d->top < 0 ? 0 : (unsigned long long)d->top + 1;
        if (d->top < 0 || ctr - from >= UDP_WINDOW)
            memset(d->seen, 0, sizeof d->seen);
        else
            for (unsigned long long c = from; c < ctr; c++)
                SEEN_WORD(d, c) &= ~SEEN_BIT(c);
        d->top = (long long)ctr;
    }
    SEEN_WORD(d, ctr) |= SEEN_BIT(ctr);
}

/* seal(head, ctr, data) -> ciphertext + tag, on a sending direction; open(head, ctr, body)
 * -> plaintext, or None if it does not authenticate, on a receiving one. */
static PyObject *UdpDir_crypt(UdpDir *d, PyObject *args, int seal) {
    Py_buffer head, in;
    unsigned long long ctr;
    if (!PyArg_ParseTuple(args, "y*Ky*", &head, &ctr, &in))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = seal ? in.len : in.len - UDP_TAG;    /* the plaintext's length */
    if (d->sending != seal || head.len != UDP_HEAD || n > UDP_MAX) {
        PyErr_SetString(PyExc_ValueError,
                        seal ? "UdpDir.seal: a sending direction, a 23-byte header, at most 65535 bytes"
                             : "UdpDir.open: a receiving direction, a 23-byte header");
    } else if (n < 0) {
        out = Py_NewRef(Py_None);
    } else if ((out = PyBytes_FromStringAndSize(NULL, n + UDP_TAG)) != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        memcpy(p, in.buf, in.len);
        if (!dir_crypt(d, head.buf, ctr, p, (int)n)) {
            Py_CLEAR(out);
            if (seal)
                PyErr_SetString(PyExc_RuntimeError, "UdpDir.seal: libcrypto failed");
            else
                out = Py_NewRef(Py_None);
        } else if (!seal && _PyBytes_Resize(&out, n) < 0) {
            out = NULL;
        }
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&in);
    return out;
}

static PyObject *UdpDir_seal(UdpDir *d, PyObject *args) {
    return UdpDir_crypt(d, args, 1);
}

static PyObject *UdpDir_open(UdpDir *d, PyObject *args) {
    return UdpDir_crypt(d, args, 0);
}

static PyObject *UdpDir_replayed(UdpDir *d, PyObject *arg) {
    unsigned long long ctr = PyLong_AsUnsignedLongLong(arg);
    if (ctr == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(dir_replayed(d, ctr));
}

static PyObject *UdpDir_accept(UdpDir *d, PyObject *arg) {
    unsigned long long ctr = PyLong_AsUnsignedLongLong(arg);
    if (ctr == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    dir_accept(d, ctr);
    Py_RETURN_NONE;
}

static PyMethodDef UdpDir_methods[] = {
    {"seal", (PyCFunction)UdpDir_seal, METH_VARARGS, "seal(head, ctr, data) -> ciphertext + tag"},
    {"open", (PyCFunction)UdpDir_open, METH_VARARGS, "open(head, ctr, body) -> plaintext, or None if it does not authenticate"},
    {"replayed", (PyCFunction)UdpDir_replayed, METH_O, "replayed(ctr): older than the window or seen in it"},
    {"accept", (PyCFunction)UdpDir_accept, METH_O, "accept(ctr): an authenticated counter moves the window"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef UdpDir_members[] = {
    {"epoch", T_UINT, offsetof(UdpDir, epoch), 0, "the epoch of this direction's key"},
    {"counter", T_ULONGLONG, offsetof(UdpDir, counter), 0, "sending: the next counter"},
    {"top", T_LONGLONG, offsetof(UdpDir, top), 0, "receiving: the highest counter accepted (-1: none)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject UdpDirType = PUMP_TYPE(
    UdpDir, "UdpDir(key, epoch, sending): one direction of a sealed UDP flow (AES-256-GCM)",
    .tp_init = (initproc)UdpDir_init, .tp_members = UdpDir_members);

/* The attribute names udp_pass reads (engine.udp.Flow, engine.udpseal.FlowKeys). */
static PyObject *s_fd, *s_state, *s_mtu, *s_last, *s_sa, *s_flow_id, *s_send, *s_recv;

/* What leaves: where, which bytes, and the plaintext length it counts for. */
typedef struct {
    int fd;
    const struct sockaddr *dest;
    socklen_t destlen;
    unsigned char *p;
    int n, plain;
} UdpOut;

/* One batch's buffers, per thread (pages are touched only as datagrams fill them). A
 * slot holds one datagram, or (UDP GRO) a run of them the kernel delivered together. */
typedef struct {
    struct mmsghdr msgs[UDP_BATCH];
    struct iovec iov[UDP_BATCH];
    struct sockaddr_storage names[UDP_BATCH];
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl[UDP_BATCH];
    UdpOut outs[UDP_OUTS];
    PyObject *slowed[UDP_OUTS];               /* flows with a datagram given back (borrowed) */
    unsigned char slots[];                    /* UDP_BATCH slots of UDP_SLOT bytes */
} UdpBatch;
static __thread UdpBatch *udp_batch;

enum { C_DGRAMS, C_BYTES, C_RATE, C_SEND, C_FORGED, C_REPLAYED, C_TRUNCATED, C_FOREIGN, C_MTU, C_N };

typedef struct {
    unsigned long long c[C_N];
    int gso;
} UdpSend;

static int udp_is_gso_refusal(int e) {
    return e == EINVAL || e == EIO || e == ENOPROTOOPT || e == EOPNOTSUPP;
}

/* Send outs[0..n) (one destination, segments of one size but the last): one sendmsg with
 * UDP GSO, else sendmmsg one datagram each. */
static void udp_send_run(UdpSend *s, UdpOut *outs, int n) {
    struct iovec iov[GSO_SEGMENTS];
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = outs[i].p;
        iov[i].iov_len = (size_t)outs[i].n;
    }
    if (n > 1 && s->gso) {
        union {
            char buf[CMSG_SPACE(sizeof(uint16_t))];
            struct cmsghdr align;
        } ctl;
        memset(&ctl, 0, sizeof ctl);
        struct msghdr m = {0};
        m.msg_name = (void *)outs[0].dest;
        m.msg_namelen = outs[0].destlen;
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)n;
        m.msg_control = ctl.buf;
        m.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t size = (uint16_t)outs[0].n;
        memcpy(CMSG_DATA(cm), &size, sizeof size);
        ssize_t r;
        do
            r = sendmsg(outs[0].fd, &m, MSG_NOSIGNAL);
        while (r < 0 && errno == EINTR);
        if (r >= 0) {
            s->c[C_DGRAMS] += (unsigned long long)n;
            for (int i = 0; i < n; i++)
                s->c[C_BYTES] += (unsigned long long)outs[i].plain;
            return;
        }
        if (!udp_is_gso_refusal(errno)) {
            s->c[C_SEND] += (unsigned long long)n;
            return;
        }
        s->gso = 0;              /* not here: one by one, now and from now on */
    }
    struct mmsghdr mm[GSO_SEGMENTS];
    memset(mm, 0, sizeof(mm[0]) * (size_t)n);
    for (int i = 0; i < n; i++) {
        mm[i].msg_hdr.msg_name = (void *)outs[i].dest;
        mm[i].msg_hdr.msg_namelen = outs[i].destlen;
        mm[i].msg_hdr.msg_iov = &iov[i];
        mm[i].msg_hdr.msg_iovlen = 1;
    }
    int k = 0;
    while (k < n) {
        int r = sendmmsg(outs[0].fd, mm + k, (unsigned int)(n - k), MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            s->c[C_SEND]++;      /* this one failed: the next ones may go */
            k++;
            continue;
        }
        for (int i = k; i < k + r; i++) {
            s->c[C_DGRAMS]++;
            s->c[C_BYTES] += (unsigned long long)outs[i].plain;
        }
        k += r;
    }
}

/* The outs in runs, as engine.udp.Run groups them. */
static void udp_send_all(UdpSend *s, UdpOut *outs, int n) {
    int i = 0;
    while (i < n) {
        int j = i + 1, size = outs[i].n;
        while (size > 0 && j < n && j - i < GSO_SEGMENTS && outs[j].fd == outs[i].fd && outs[j].destlen == outs[i].destlen &&
               (outs[i].dest == NULL || memcmp(outs[j].dest, outs[i].dest, outs[i].destlen) == 0) &&
               outs[j].n <= size && outs[j - 1].n == size && (j - i + 1) * size <= GSO_BYTES)
            j++;
        udp_send_run(s, outs + i, j - i);
        i = j;
    }
}

static long long get_ll(PyObject *o, PyObject *name, int *err) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) {
        *err = 1;
        return 0;
    }
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        *err = 1;
    return x;
}

/* A flow's keys' direction (send or recv), borrowed-through-owner: NULL if none (or not ours). */
static UdpDir *flow_dir(PyObject *state, PyObject *name) {
    PyObject *v = PyObject_GetAttr(state, name);
    if (v == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyObject_TypeCheck(v, &UdpDirType)) {
        Py_DECREF(v);
        return NULL;
    }
    Py_DECREF(v);                /* the state holds it for the call */
    return (UdpDir *)v;
}

static int flow_id_is(PyObject *state, const unsigned char *id) {
    PyObject *v = PyObject_GetAttr(state, s_flow_id);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int same = PyBytes_Check(v) && PyBytes_GET_SIZE(v) == 8 && memcmp(PyBytes_AS_STRING(v), id, 8) == 0;
    Py_DECREF(v);
    return same;
}

static PyObject *udp_source(const struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo), a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return Py_BuildValue("(si)", host, ntohs(a->sin_port));
}

#define MODE_PLAIN 0
#define MODE_OPEN 1
#define MODE_SEAL 2

/* udp_pass(fd, flows, flow, mode, out_fd, counters, direction, tokens, burst, tag, rekey_after, now, gso)
 *   -> (slow, tokens, gso)
 * fd: the socket read (a listener, or a flow's socket). flows: a listener's {source
 * sockaddr bytes: Flow} (each out through its flow's connected socket ``fd``), or None and
 * ``flow`` the one flow whose socket fd is (out through out_fd, to ``flow.sa``). mode: what
 * the datagrams read need (0 plain, 1 open, 2 seal). tokens < 0: no rate. slow: the datagrams
 * for the Python path, [(source, sockaddr bytes, data)]. */
static PyObject *udp_pass(PyObject *self, PyObject *args) {
    int fd, mode, out_fd, gso;
    PyObject *flows, *fixed, *counters;
    const char *direction;
    double tokens, burst, now;
    Py_buffer tag;
    unsigned long long rekey_after;
    if (!PyArg_ParseTuple(args, "iOOiiOsddy*Kdp", &fd, &flows, &fixed, &mode, &out_fd, &counters, &direction,
                          &tokens, &burst, &tag, &rekey_after, &now, &gso))
        return NULL;
    PyObject *slow = NULL, *nowf = NULL, *result = NULL, *fixed_sa = NULL, *state = NULL;
    PyObject *prev_key = NULL, *prev_flow = NULL;   /* the last datagram's source and flow (owned) */
    UdpSend s = {{0}, gso};
    UdpOut *outs;
    int nout = 0;
    PyObject **slowed;
    int nslowed = 0;
    if (!PyDict_Check(counters) || (flows != Py_None && !PyDict_Check(flows)) || (flows == Py_None && fixed == Py_None) ||
        (mode != MODE_PLAIN && tag.len != 4)) {
        PyErr_SetString(PyExc_TypeError, "udp_pass: counters a dict, flows a dict or a flow, a 4-byte tag when sealed");
        goto done;
    }
    if (udp_batch == NULL)
        udp_batch = calloc(1, sizeof *udp_batch + (size_t)UDP_BATCH * UDP_SLOT);
    if (udp_batch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    UdpBatch *b = udp_batch;
    outs = b->outs;
    slowed = b->slowed;
    for (int i = 0; i < UDP_BATCH; i++) {
        b->iov[i].iov_base = b->slots + (size_t)i * UDP_SLOT + UDP_HEAD;
        b->iov[i].iov_len = UDP_MAX;
        memset(&b->msgs[i].msg_hdr, 0, sizeof b->msgs[i].msg_hdr);
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
        b->msgs[i].msg_hdr.msg_name = &b->names[i];
        b->msgs[i].msg_hdr.msg_namelen = sizeof b->names[i];
        b->msgs[i].msg_hdr.msg_control = b->ctl[i].buf;
        b->msgs[i].msg_hdr.msg_controllen = sizeof b->ctl[i].buf;
    }
    int got;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        got = recvmmsg(fd, b->msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
        Py_END_ALLOW_THREADS
        if (got >= 0 || errno != EINTR)
            break;
    }
    slow = PyList_New(0);
    nowf = PyFloat_FromDouble(now);
    if (slow == NULL || nowf == NULL)
        goto done;
    if (got < 0)
        got = 0;    /* nothing now (EAGAIN), or an ICMP error of an earlier send: as Python, read on later */
    /* the fixed flow's reply address (flow path) */
    const struct sockaddr *fixed_dest = NULL;
    socklen_t fixed_len = 0;
    if (flows == Py_None) {
        fixed_sa = PyObject_GetAttr(fixed, s_sa);
        if (fixed_sa == NULL || !PyBytes_Check(fixed_sa) || PyBytes_GET_SIZE(fixed_sa) == 0) {
            PyErr_SetString(PyExc_TypeError, "udp_pass: the flow has no sockaddr (sa)");
            goto done;
        }
        fixed_dest = (const struct sockaddr *)PyBytes_AS_STRING(fixed_sa);
        fixed_len = (socklen_t)PyBytes_GET_SIZE(fixed_sa);
    }
    const unsigned char *tagp = tag.buf;
    for (int i = 0; i < got; i++) {
        unsigned char *slot = b->slots + (size_t)i * UDP_SLOT;
        int total = (int)b->msgs[i].msg_len;
        if (b->msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
            continue;                            /* over 65535: cannot be */
        int segsize = total;                     /* UDP GRO: datagrams of segsize bytes (the last shorter) */
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&b->msgs[i].msg_hdr); cm != NULL;
             cm = CMSG_NXTHDR(&b->msgs[i].msg_hdr, cm))
            if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO) {
                int v;
                memcpy(&v, CMSG_DATA(cm), sizeof v);
                if (v > 0 && v < total)
                    segsize = v;
            }
        socklen_t nl = b->msgs[i].msg_hdr.msg_namelen;
        PyObject *flow = fixed;
        if (flows != Py_None) {
            if (prev_key == NULL || (socklen_t)PyBytes_GET_SIZE(prev_key) != nl ||
                memcmp(PyBytes_AS_STRING(prev_key), &b->names[i], nl) != 0) {
                Py_XDECREF(prev_key);
                Py_CLEAR(prev_flow);
                prev_key = PyBytes_FromStringAndSize((const char *)&b->names[i], nl);
                if (prev_key == NULL)
                    goto done;
                prev_flow = PyDict_GetItemWithError(flows, prev_key);
                if (prev_flow == NULL && PyErr_Occurred())
                    goto done;
                Py_XINCREF(prev_flow);
            }
            flow = prev_flow;
        }
        int nseg = total == 0 ? 1 : (total + segsize - 1) / segsize;
        for (int sg = 0; sg < nseg; sg++) {
        Py_CLEAR(state);
        int whole = nseg == 1;
        unsigned char *p = slot + UDP_HEAD + (size_t)sg * (size_t)segsize;
        int n = total - sg * segsize < segsize ? total - sg * segsize : segsize;
        /* checks that need no flow: as udpseal's open, first */
        if (mode == MODE_OPEN) {
            if (n < UDP_OVERHEAD || p[0] != UDP_VERSION) {
                s.c[C_TRUNCATED]++;
                continue;
            }
            if (memcmp(p + 1, tagp, 4) != 0) {
                s.c[C_FOREIGN]++;
                continue;
            }
        }
        int fast = flow != NULL && nout < UDP_OUTS && (whole || mode != MODE_SEAL);
        for (int k = 0; fast && k < nslowed; k++)
            if (slowed[k] == flow)
                fast = 0;
        UdpDir *d = NULL;
        if (fast && mode != MODE_PLAIN) {
            state = PyObject_GetAttr(flow, s_state);
            if (state == NULL)
                goto done;
            if (state == Py_None)
                fast = 0;
            else if (mode == MODE_OPEN) {
                d = flow_dir(state, s_recv);
                unsigned int epoch = (unsigned int)p[13] << 8 | p[14];
                if (d == NULL || !flow_id_is(state, p + 5) || epoch != d->epoch)
                    fast = 0;
            } else {
                d = flow_dir(state, s_send);
                if (d == NULL || d->counter >= rekey_after)
                    fast = 0;
            }
        }
        if (!fast) {
            if (flow != NULL && nslowed < UDP_OUTS)
                slowed[nslowed++] = flow;
            PyObject *src = udp_source(&b->names[i]);
            PyObject *item = src ? Py_BuildValue("(Oy#y#)", src, (const char *)&b->names[i], (Py_ssize_t)nl,
                                                 p, (Py_ssize_t)n) : NULL;
            Py_XDECREF(src);
            if (item == NULL || PyList_Append(slow, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
            continue;
        }
        unsigned char *out = p;
        int outn = n, plain = n;
        if (mode == MODE_OPEN) {
            unsigned long long ctr = 0;
            for (int k = 0; k < 8; k++)
                ctr = ctr << 8 | p[15 + k];
            if (dir_replayed(d, ctr)) {
                s.c[C_REPLAYED]++;
                continue;
            }
            plain = n - UDP_OVERHEAD;
            if (!dir_crypt(d, p, ctr, p + UDP_HEAD, plain)) {
                s.c[C_FORGED]++;
                continue;
            }
            dir_accept(d, ctr);
            out = p + UDP_HEAD;
            outn = plain;
        }
        /* the session's rate, as engine.udp.try_pay */
        if (tokens >= 0) {
            double want = (double)plain < burst ? (double)plain : burst;
            if (tokens < want) {
                s.c[C_RATE]++;
                continue;
            }
            tokens -= (double)plain;
        }
        if (PyObject_SetAttr(flow, s_last, nowf) < 0)
            goto done;
        if (mode == MODE_SEAL) {
            unsigned long long ctr = d->counter++;
            slot[0] = UDP_VERSION;
            memcpy(slot + 1, tagp, 4);
            PyObject *fid = PyObject_GetAttr(state, s_flow_id);
            if (fid == NULL || !PyBytes_Check(fid) || PyBytes_GET_SIZE(fid) != 8) {
                Py_XDECREF(fid);
                PyErr_SetString(PyExc_TypeError, "udp_pass: a flow id is 8 bytes");
                goto done;
            }
            memcpy(slot + 5, PyBytes_AS_STRING(fid), 8);
            Py_DECREF(fid);
            slot[13] = (unsigned char)(d->epoch >> 8);
            slot[14] = (unsigned char)d->epoch;
            put_ctr(slot + 15, ctr);
            if (!dir_crypt(d, slot, ctr, p, n)) {
                PyErr_SetString(PyExc_RuntimeError, "udp_pass: libcrypto failed to seal");
                goto done;
            }
            out = slot;
            outn = n + UDP_OVERHEAD;
            int err = 0;
            long long mtu = get_ll(flow, s_mtu, &err);
            if (err)
                goto done;
            if (mtu && outn + UDP_IP_UDP > mtu)
                s.c[C_MTU]++;
        }
        UdpOut *o = &outs[nout];
        o->p = out;
        o->n = outn;
        o->plain = plain;
        if (flows != Py_None) {
            int err = 0;
            o->fd = (int)get_ll(flow, s_fd, &err);
            if (err)
                goto done;
            o->dest = NULL;
            o->destlen = 0;
        } else {
            o->fd = out_fd;
            o->dest = fixed_dest;
            o->destlen = fixed_len;
        }
        nout++;
        }
    }
    udp_send_all(&s, outs, nout);
    {
        static const char *names[C_N] = {"datagrams_", "bytes_", "drops_rate", "drops_send", "drops_forged",
                                         "drops_replayed", "drops_truncated", "drops_foreign", "over_mtu"};
        char name[32];
        for (int k = 0; k < C_N; k++) {
            if (!s.c[k])
                continue;
            if (k <= C_BYTES)
                snprintf(name, sizeof name, "%s%s", names[k], direction);
            else
                snprintf(name, sizeof name, "%s", names[k]);
            PyObject *was = PyDict_GetItemString(counters, name);
            unsigned long long v = was != NULL ? PyLong_AsUnsignedLongLong(was) : 0;
            if (PyErr_Occurred())
                goto done;
            PyObject *nv = PyLong_FromUnsignedLongLong(v + s.c[k]);
            if (nv == NULL || PyDict_SetItemString(counters, name, nv) < 0) {
                Py_XDECREF(nv);
                goto done;
            }
            Py_DECREF(nv);
        }
    }
    result = Py_BuildValue("(Odi)", slow, tokens, s.gso);
done:
    Py_XDECREF(state);
    Py_XDECREF(prev_key);
    Py_XDECREF(prev_flow);
    Py_XDECREF(fixed_sa);
    Py_XDECREF(slow);
    Py_XDECREF(nowf);
    PyBuffer_Release(&tag);
    return result;
}

static PyMethodDef module_methods[] = {
    {"set_ticket_keys", set_ticket_keys, METH_VARARGS,
     "set_ticket_keys(sslobj, inc, out, keys): the session-ticket keys of sslobj's context (80 bytes)"},
    {"set_groups", set_groups, METH_VARARGS,
     "set_groups(sslobj, inc, out, groups): the key exchange groups of sslobj's context (OpenSSL's list)"},
    {"same_libssl", same_libssl, METH_VARARGS,
     "same_libssl(path or None) -> (the object at path calls our libssl, our OpenSSL_version_num())"},
    {"udp_pass", udp_pass, METH_VARARGS,
     "udp_pass(fd, flows, flow, mode, out_fd, counters, direction, tokens, burst, tag, rekey_after, now, gso)"
     " -> (slow datagrams, tokens, gso): one batch of a UDP socket (engine.udp)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pump", "The compiled hot paths of the built-in data server.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pump(void) {
    if ((s_fd = PyUnicode_InternFromString("fd")) == NULL || (s_state = PyUnicode_InternFromString("state")) == NULL ||
        (s_mtu = PyUnicode_InternFromString("mtu")) == NULL || (s_last = PyUnicode_InternFromString("last")) == NULL ||
        (s_sa = PyUnicode_InternFromString("sa")) == NULL || (s_flow_id = PyUnicode_InternFromString("flow_id")) == NULL ||
        (s_send = PyUnicode_InternFromString("send")) == NULL || (s_recv = PyUnicode_InternFromString("recv")) == NULL)
        return NULL;
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (ssl == NULL)
        return NULL;
    SSLErrorType = PyObject_GetAttrString(ssl, "SSLError");
    Py_DECREF(ssl);
    if (SSLErrorType == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddType(m, &EngineType) < 0 || PyModule_AddType(m, &CopierType) < 0 ||
        PyModule_AddType(m, &HubType) < 0 || PyModule_AddType(m, &UdpDirType) < 0 ||
        PyModule_AddIntConstant(m, "UDP_BATCH", UDP_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "F_SRC_AGAIN", F_SRC_AGAIN) < 0 ||
        PyModule_AddIntConstant(m, "F_DST_AGAIN", F_DST_AGAIN) < 0 ||
        PyModule_AddIntConstant(m, "F_EOF", F_EOF) < 0 ||
        PyModule_AddIntConstant(m, "F_EMPTY", F_EMPTY) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", CHUNK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
