/* 8-byte atomics on raw addresses, for memory shared between processes.
 *
 * Python has no atomic compare-and-swap or fetch-and-add on a buffer; a NIC does them in
 * hardware. These three functions are the whole of what the emulated NIC and the shm client
 * need: the lock-prefixed instructions the CPU offers, called with METH_FASTCALL so that the
 * call costs tens of nanoseconds. Bounds, alignment and keys are checked by the caller
 * (emulator.memory) before an address gets here.
 *
 * ``run`` executes a whole batch of the shm client's verbs (transports.shm), checks included:
 * done verb by verb in Python, those checks, copies and counts were a fifth of the client's
 * CPU per operation. ``serve`` is the memory node's counterpart for the zmq transport: a
 * whole msgpack request of one-sided verbs read, checked, run and answered in one call;
 * ``pack`` writes that request on the zmq client's side, and ``group`` sorts out a batch
 * spanning nodes into their messages.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <assert.h>
#include <stdint.h>

static int get_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);   /* wraps modulo 2**64 */
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

static PyObject *atomic_cas(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t addr, expected, desired;
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "cas(address, expected, desired)"); return NULL; }
    if (get_u64(args[0], &addr) || get_u64(args[1], &expected) || get_u64(args[2], &desired)) return NULL;
    if (addr & 7) { PyErr_SetString(PyExc_ValueError, "unaligned atomic"); return NULL; }
    uint64_t old = expected;
    __atomic_compare_exchange_n((uint64_t *)(uintptr_t)addr, &old, desired, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *atomic_faa(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t addr, delta;
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "faa(address, delta)"); return NULL; }
    if (get_u64(args[0], &addr) || get_u64(args[1], &delta)) return NULL;
    if (addr & 7) { PyErr_SetString(PyExc_ValueError, "unaligned atomic"); return NULL; }
    uint64_t old = __atomic_fetch_add((uint64_t *)(uintptr_t)addr, delta, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *atomic_load(PyObject *self, PyObject *arg) {
    uint64_t addr;
    if (get_u64(arg, &addr)) return NULL;
    if (addr & 7) { PyErr_SetString(PyExc_ValueError, "unaligned atomic"); return NULL; }
    return PyLong_FromUnsignedLongLong(__atomic_load_n((uint64_t *)(uintptr_t)addr, __ATOMIC_SEQ_CST));
}

/* address(buffer) -> the address of a writable buffer's first byte. The caller keeps the
 * buffer's owner alive for as long as it uses the address. */
static PyObject *atomic_address(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    uintptr_t a = (uintptr_t)view.buf;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((unsigned long long)a);
}

/* run(batch, table, regions, kinds, counts) -> completions, or None.
 *
 * The shm client's whole batch of one-sided verbs in one call, for the common case where
 * every request is a Read, Write (of bytes), Cas or Faa that a NIC would accept: ``table``
 * has, per node id, None or (address of offset 0, length, rkey[, region]), the access key
 * that ``regions[node].rkey`` must still name: ``region``, when given, is the (frozen)
 * RegionInfo whose rkey that is, and while ``regions[node]`` is that very object its rkey
 * is not looked up again. Every request is checked first and only then does
 * any run, so when one would fail (unknown node, out of range, unaligned, wrong key, an
 * operand that is not an unsigned 64-bit int...) the answer is None with nothing done, and
 * the caller's Python path runs the batch with its per-request errors. ``kinds`` is
 * (Read, Write, Cas, Faa); ``counts`` (transports.base.TransportStats.counts) gets the
 * batch's counts. */
enum { K_READ, K_WRITE, K_CAS, K_FAA };

typedef struct { int kind; char *at; uint64_t a, b; Py_ssize_t len; PyObject *data; } checked_t;

/* 0 ok, 1 not an unsigned 64-bit int. Most operands (nodes, addresses, lengths) are below
 * 2**63: PyLong_AsLongLongAndOverflow reads those from their digits, where
 * PyLong_AsUnsignedLongLong goes through _PyLong_AsByteArray for every int (CPython 3.11:
 * about 200 instructions a call, a dozen calls per verb); only slot values of 2**63 and up
 * (a CAS's operands) take that path, and on CPython 3.11 not even those (read from their
 * digits below). */
static int u64_of(PyObject *o, uint64_t *out) {
    if (!PyLong_CheckExact(o)) return 1;
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* CPython 3.11's ints: the sign in ob_size, 30-bit digits. Most operands have at most
     * two (below 2**60): read here, not through a call (a run's two dozen per batch); slot
     * values (a CAS's operands, 2**60 and up) have three, the top one below 2**4 in 64 bits
     * (16 and up: 2**64 and up, refused) */
    Py_ssize_t digits = Py_SIZE(o);
    if (digits >= 0 && digits <= 3) {
        const digit *d = ((PyLongObject *)o)->ob_digit;
        if (digits == 3 && d[2] >> (64 - 2 * PyLong_SHIFT)) return 1;
        *out = digits == 0 ? 0 : digits == 1 ? (uint64_t)d[0]
             : digits == 2 ? (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT
             : (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT
               | (uint64_t)d[2] << (2 * PyLong_SHIFT);
        return 0;
    }
#endif
    int over;
    long long small = PyLong_AsLongLongAndOverflow(o, &over);
    if (!over) {
        if (small < 0) return 1;
        *out = (uint64_t)small;
        return 0;
    }
    if (over < 0) return 1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return 1; }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *str_rkey;

/* Add a batch's counts to ``counts`` (transports.base.TransportStats.counts: an array of
 * signed 64-bit integers, round_trips, verbs, reads, writes, atomics, bytes_in, bytes_out,
 * ...) in place: no Python object made, none looked up. */
static int add_counts(PyObject *counts, const long long *delta) {
    Py_buffer view;
    if (PyObject_GetBuffer(counts, &view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return -1;
    int ok = view.itemsize == sizeof(long long) && view.format && !strcmp(view.format, "q") &&
             view.len >= (Py_ssize_t)(7 * sizeof(long long));
    if (ok) {
        long long *c = view.buf;
        for (int i = 0; i < 7; i++) c[i] += delta[i];
    } else {
        PyErr_SetString(PyExc_TypeError, "counts must be an array('q') of at least 7 items");
    }
    PyBuffer_Release(&view);
    return ok ? 0 : -1;
}

static PyObject *run_batch(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n == 5 && !PyList_CheckExact(args[0])) return Py_NewRef(Py_None);   /* the general path */
    if (n != 5 || !PyTuple_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2]) || !PyTuple_CheckExact(args[3]) || PyTuple_GET_SIZE(args[3]) != 4) {
        PyErr_SetString(PyExc_TypeError, "run(batch: list, table: tuple, regions: dict, kinds: tuple, counts)");
        return NULL;
    }
    PyObject *batch = args[0], *table = args[1], *regions = args[2], *kinds = args[3];
    Py_ssize_t count = PyList_GET_SIZE(batch), nodes = PyTuple_GET_SIZE(table);
    checked_t small[64], *req = count <= 64 ? small : PyMem_Malloc(count * sizeof(checked_t));
    if (!req) return PyErr_NoMemory();
    /* nodes (< 64) whose table entry was read and access key checked already, and that
     * entry's base and size: read once per batch, not once per request */
    uint64_t keyed = 0, bases[64], sizes[64];
    long long delta[7] = {1, count, 0, 0, 0, 0, 0};
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(batch, i);
        PyTypeObject *t = Py_TYPE(r);
        int kind = -1;
        for (int k = 0; k < 4; k++)
            if ((PyObject *)t == PyTuple_GET_ITEM(kinds, k)) kind = k;
        if (kind < 0 || PyTuple_GET_SIZE(r) != (kind == K_CAS ? 4 : 3)) goto general;
        uint64_t node, addr;
        if (u64_of(PyTuple_GET_ITEM(r, 0), &node) || node >= (uint64_t)nodes ||
            u64_of(PyTuple_GET_ITEM(r, 1), &addr)) goto general;
        uint64_t base, size, rkey;
        if (node < 64 && keyed >> node & 1) {      /* the node of an earlier request */
            base = bases[node];
            size = sizes[node];
        } else {
            PyObject *st = PyTuple_GET_ITEM(table, node);
            if (st == Py_None) goto general;
            if (!PyTuple_Check(st) || (PyTuple_GET_SIZE(st) != 3 && PyTuple_GET_SIZE(st) != 4)) {
                PyErr_SetString(PyExc_TypeError,
                                "a table entry is None or (address, length, rkey[, region])");
                goto done;
            }
            if (u64_of(PyTuple_GET_ITEM(st, 0), &base) || u64_of(PyTuple_GET_ITEM(st, 1), &size) ||
                u64_of(PyTuple_GET_ITEM(st, 2), &rkey)) goto general;
            /* regions[node].rkey == rkey? */
            PyObject *region = PyDict_GetItemWithError(regions, PyTuple_GET_ITEM(r, 0));
            if (!region) { if (PyErr_Occurred()) goto done; goto general; }
            if (PyTuple_GET_SIZE(st) != 4 || region != PyTuple_GET_ITEM(st, 3)) {
                PyObject *key = PyObject_GetAttr(region, str_rkey);
                if (!key) goto done;
                uint64_t now;
                int bad = u64_of(key, &now) || now != rkey;
                Py_DECREF(key);
                if (bad) goto general;
            }
            if (node < 64) {
                keyed |= 1ULL << node;
                bases[node] = base;
                sizes[node] = size;
            }
        }
        checked_t *c = &req[i];
        c->kind = kind;
        c->at = (char *)(uintptr_t)(base + addr);
        if (kind == K_READ || kind == K_WRITE) {
            uint64_t len;
            if (kind == K_READ) {
                if (u64_of(PyTuple_GET_ITEM(r, 2), &len)) goto general;
                delta[2]++;
                delta[5] += len;
            } else {
                c->data = PyTuple_GET_ITEM(r, 2);
                if (!PyBytes_CheckExact(c->data)) goto general;
                len = PyBytes_GET_SIZE(c->data);
                delta[3]++;
                delta[6] += len;
            }
            if (addr > size || len > size - addr) goto general;
            c->len = (Py_ssize_t)len;
        } else {
            if (addr & 7 || size < 8 || addr > size - 8) goto general;
            if (kind == K_CAS) {
                if (u64_of(PyTuple_GET_ITEM(r, 2), &c->a) || u64_of(PyTuple_GET_ITEM(r, 3), &c->b))
                    goto general;
            } else {
                PyObject *d = PyTuple_GET_ITEM(r, 2);
                if (!PyLong_CheckExact(d)) goto general;
                c->a = (uint64_t)PyLong_AsUnsignedLongLongMask(d);     /* wraps, as FAA does */
                if (c->a == (uint64_t)-1 && PyErr_Occurred()) goto done;
            }
            delta[4]++;
        }
    }
    out = PyList_New(count);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {       /* checked: nothing below can fail but memory */
        checked_t *c = &req[i];
        PyObject *done;
        if (c->kind == K_READ) {
            done = PyBytes_FromStringAndSize(c->at, c->len);
        } else if (c->kind == K_WRITE) {
            memcpy(c->at, PyBytes_AS_STRING(c->data), c->len);
            done = Py_NewRef(Py_None);
        } else if (c->kind == K_CAS) {
            uint64_t old = c->a;
            __atomic_compare_exchange_n((uint64_t *)c->at, &old, c->b, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            done = PyLong_FromUnsignedLongLong(old);
        } else {
            done = PyLong_FromUnsignedLongLong(__atomic_fetch_add((uint64_t *)c->at, c->a,
                                                                  __ATOMIC_SEQ_CST));
        }
        if (!done) { Py_CLEAR(out); goto done; }
        PyList_SET_ITEM(out, i, done);
    }
    if (add_counts(args[4], delta) < 0) Py_CLEAR(out);
    goto done;
general:
    out = Py_NewRef(Py_None);
done:
    if (req != small) PyMem_Free(req);
    return out;
}

/* serve(request, base, size, rkey, max_batch) -> (verbs, reply), or None.
 *
 * The memory node's whole request for the common case, a batch of one-sided verbs that a
 * NIC would accept: the msgpack request [VERBS, seq, rkey, [[opcode, addr, a(, b)], ...]]
 * (fusee.emulator.wire) is read in place, every verb checked first (opcode, operand types,
 * the region's key, bounds, alignment) and only then are they run on the mapping at
 * ``base`` (``size`` bytes), writing the msgpack reply [seq, [completion, ...], nil] as it
 * goes: a READ's bytes are copied once, from the region into the reply, and a WRITE's once,
 * from the request into the region. Decoded into Python objects and run verb by verb, that
 * was most of the MN's CPU per request. Anything else (a control request, ALLOC/FREE, a
 * wrong key, a malformed or failing verb, more than ``max_batch`` verbs) gives None with
 * nothing done: the caller's Python path serves it and words its refusal. */
enum { W_READ, W_WRITE, W_CAS, W_FAA };             /* fusee.emulator.wire's OP_* */

typedef struct { const unsigned char *p, *end; } cursor_t;

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

static int take_uint(cursor_t *c, uint64_t *out) {  /* 0 ok, -1 not a msgpack uint */
    if (c->p >= c->end) return -1;
    unsigned char t = *c->p++;
    int n = t <= 0x7f ? 0 : t == 0xcc ? 1 : t == 0xcd ? 2 : t == 0xce ? 4 : t == 0xcf ? 8 : -1;
    if (n < 0 || c->end - c->p < n) return -1;
    *out = n ? be(c->p, n) : t;
    c->p += n;
    return 0;
}

static int take_array(cursor_t *c, uint64_t *len) {
    if (c->p >= c->end) return -1;
    unsigned char t = *c->p++;
    int n = (t & 0xf0) == 0x90 ? 0 : t == 0xdc ? 2 : t == 0xdd ? 4 : -1;
    if (n < 0 || c->end - c->p < n) return -1;
    *len = n ? be(c->p, n) : (uint64_t)(t & 0x0f);
    c->p += n;
    return 0;
}

static int take_bin(cursor_t *c, const unsigned char **at, uint64_t *len) {
    if (c->p >= c->end) return -1;
    unsigned char t = *c->p++;
    int n = t == 0xc4 ? 1 : t == 0xc5 ? 2 : t == 0xc6 ? 4 : -1;
    if (n < 0 || c->end - c->p < n) return -1;
    *len = be(c->p, n);
    c->p += n;
    if ((uint64_t)(c->end - c->p) < *len) return -1;
    *at = c->p;
    c->p += *len;
    return 0;
}

static unsigned char *put_be(unsigned char *o, unsigned char tag, uint64_t v, int n) {
    *o++ = tag;
    for (int i = n - 1; i >= 0; i--) *o++ = (unsigned char)(v >> (8 * i));
    return o;
}

typedef struct { int kind; unsigned char *at; uint64_t a, b; const unsigned char *data; } served_t;

static PyObject *serve_request(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t base, size, rkey, max_batch;
    if (n != 5 || get_u64(args[1], &base) || get_u64(args[2], &size) ||
        get_u64(args[3], &rkey) || get_u64(args[4], &max_batch)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "serve(request, base, size, rkey, max_batch)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    cursor_t c = {view.buf, (const unsigned char *)view.buf + view.len};
    served_t small[64], *req = small;
    PyObject *out = NULL;
    uint64_t len, kind, seq, key, count;
    if (take_array(&c, &len) || len != 4 || take_uint(&c, &kind) || kind != 0 ||
        take_uint(&c, &seq) || take_uint(&c, &key) || key != rkey ||
        take_array(&c, &count) || count > max_batch) goto general;
    if (count > 64 && !(req = PyMem_Malloc(count * sizeof(served_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    /* the reply's size: [seq, [results], nil] with seq a uint64 and the results' array32 */
    uint64_t reply_len = 1 + 9 + 5 + 1;
    for (uint64_t i = 0; i < count; i++) {
        served_t *r = &req[i];
        uint64_t fields, op, addr;
        if (take_array(&c, &fields) || take_uint(&c, &op) || take_uint(&c, &addr)) goto general;
        r->kind = (int)op;
        r->at = (unsigned char *)(uintptr_t)(base + addr);
        if (op == W_READ && fields == 3) {
            if (take_uint(&c, &r->a) || addr > size || r->a > size - addr ||
                r->a > 0xffffffffu) goto general;           /* a bin32 holds it */
            reply_len += 5 + r->a;
        } else if (op == W_WRITE && fields == 3) {
            if (take_bin(&c, &r->data, &r->a) || addr > size || r->a > size - addr) goto general;
            reply_len += 1;
        } else if ((op == W_CAS && fields == 4) || (op == W_FAA && fields == 3)) {
            if (take_uint(&c, &r->a) || (op == W_CAS && take_uint(&c, &r->b)) ||
                addr & 7 || size < 8 || addr > size - 8) goto general;
            reply_len += 9;
        } else {
            goto general;
        }
    }
    if (c.p != c.end || reply_len > PY_SSIZE_T_MAX) goto general;   /* trailing bytes */
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)reply_len);
    if (!out) goto done;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    *o++ = 0x93;
    o = put_be(o, 0xcf, seq, 8);
    o = put_be(o, 0xdd, count, 4);
    for (uint64_t i = 0; i < count; i++) {        /* checked: nothing below can fail */
        served_t *r = &req[i];
        if (r->kind == W_READ) {
            o = put_be(o, 0xc6, r->a, 4);
            memcpy(o, r->at, r->a);
            o += r->a;
        } else if (r->kind == W_WRITE) {
            memcpy(r->at, r->data, r->a);
            *o++ = 0xc0;
        } else if (r->kind == W_CAS) {
            uint64_t old = r->a;
            __atomic_compare_exchange_n((uint64_t *)r->at, &old, r->b, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            o = put_be(o, 0xcf, old, 8);
        } else {
            o = put_be(o, 0xcf, __atomic_fetch_add((uint64_t *)r->at, r->a, __ATOMIC_SEQ_CST), 8);
        }
    }
    *o++ = 0xc0;
    assert(o == (unsigned char *)PyBytes_AS_STRING(out) + reply_len);
    PyObject *reply = out;
    out = Py_BuildValue("(KN)", (unsigned long long)count, reply);
    goto done;
general:
    out = Py_NewRef(Py_None);
done:
    if (req != small) PyMem_Free(req);
    PyBuffer_Release(&view);
    return out;
}

/* unpack(reply) -> (seq, [completion, ...], None), or None.
 *
 * The client's side of ``serve``: a memory node's msgpack reply [seq, [completion, ...], nil]
 * to a batch of one-sided verbs that all completed, read in one pass (a completion is a
 * READ's bin, a WRITE's nil or an atomic's uint), as msgpack.unpackb would read it, minus the
 * keyword arguments and the generic object hooks that cost more than the decoding. Anything
 * else (an error, a negative seq, a type no verb completes with, trailing bytes) gives None:
 * the caller decodes it with msgpack. */
static PyObject *unpack_reply(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    cursor_t c = {view.buf, (const unsigned char *)view.buf + view.len};
    PyObject *results = NULL, *out = NULL;
    uint64_t len, seq, count;
    if (take_array(&c, &len) || len != 3 || take_uint(&c, &seq) ||
        take_array(&c, &count) || count > (uint64_t)(c.end - c.p)) goto general;
    if (!(results = PyList_New((Py_ssize_t)count))) goto done;
    for (uint64_t i = 0; i < count; i++) {
        if (c.p >= c.end) goto general;
        unsigned char t = *c.p;
        PyObject *item;
        if (t == 0xc0) {
            c.p++;
            item = Py_NewRef(Py_None);
        } else if (t >= 0xc4 && t <= 0xc6) {
            const unsigned char *at;
            uint64_t n;
            if (take_bin(&c, &at, &n)) goto general;
            item = PyBytes_FromStringAndSize((const char *)at, (Py_ssize_t)n);
        } else {
            uint64_t v;
            if (take_uint(&c, &v)) goto general;
            item = PyLong_FromUnsignedLongLong(v);
        }
        if (!item) goto done;
        PyList_SET_ITEM(results, (Py_ssize_t)i, item);
    }
    if (c.end - c.p != 1 || *c.p != 0xc0) goto general;        /* no error, nothing after */
    out = Py_BuildValue("(KOO)", (unsigned long long)seq, results, Py_None);
    goto done;
general:
    out = Py_NewRef(Py_None);
done:
    Py_XDECREF(results);
    PyBuffer_Release(&view);
    return out;
}

/* pack(seq, rkey, batch, kinds, positions=None) -> the msgpack verbs request, or None.
 *
 * The zmq client's side of ``serve``: [VERBS, seq, rkey, [[opcode, addr, a(, b)], ...]]
 * (fusee.emulator.wire.encode_verbs) written in one call, of the requests of ``batch`` at
 * ``positions`` (one node's part of a batch, ``group``) or of all of them, for a batch of Read, Write (of
 * bytes), Cas and Faa whose operands are unsigned 64-bit ints (a FAA's delta wraps, as the
 * verb does). Integers are written as msgpack uint64, which any decoder reads as the same
 * value. Anything else gives None, and encode_verbs packs it in Python. ``kinds`` is
 * (Read, Write, Cas, Faa). */
static PyObject *pack_verbs(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t seq, rkey;
    if ((n == 4 || n == 5) && !PyList_CheckExact(args[2])) return Py_NewRef(Py_None);
    if ((n != 4 && n != 5) || !PyTuple_CheckExact(args[3]) || PyTuple_GET_SIZE(args[3]) != 4 ||
        (n == 5 && args[4] != Py_None && !PyList_CheckExact(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "pack(seq, rkey, batch: list, kinds: tuple, "
                                         "positions: list | None = None)");
        return NULL;
    }
    if (u64_of(args[0], &seq) || u64_of(args[1], &rkey)) return Py_NewRef(Py_None);
    PyObject *batch = args[2], *kinds = args[3];
    PyObject *positions = n == 5 && args[4] != Py_None ? args[4] : NULL;
    Py_ssize_t count = positions ? PyList_GET_SIZE(positions) : PyList_GET_SIZE(batch);
    if ((uint64_t)count > 0xffffffffu) return Py_NewRef(Py_None);
    if (positions) {                                /* each an index into the batch */
        for (Py_ssize_t j = 0; j < count; j++) {
            PyObject *p = PyList_GET_ITEM(positions, j);
            Py_ssize_t i = PyLong_CheckExact(p) ? PyLong_AsSsize_t(p) : -1;
            if (i < 0 || i >= PyList_GET_SIZE(batch)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_IndexError, "pack: a position outside the batch");
                return NULL;
            }
        }
    }
#define REQUEST(j) PyList_GET_ITEM(batch, positions ? \
        PyLong_AsSsize_t(PyList_GET_ITEM(positions, (j))) : (j))
    uint64_t size = 1 + 1 + 9 + 9 + 5;
    for (Py_ssize_t i = 0; i < count; i++) {       /* check, and size the message */
        PyObject *r = REQUEST(i);
        int kind = -1;
        for (int k = 0; k < 4; k++)
            if ((PyObject *)Py_TYPE(r) == PyTuple_GET_ITEM(kinds, k)) kind = k;
        if (kind < 0 || PyTuple_GET_SIZE(r) != (kind == K_CAS ? 4 : 3)) return Py_NewRef(Py_None);
        uint64_t v;
        if (u64_of(PyTuple_GET_ITEM(r, 1), &v)) return Py_NewRef(Py_None);
        PyObject *a = PyTuple_GET_ITEM(r, 2);
        if (kind == K_WRITE) {
            if (!PyBytes_CheckExact(a) || (uint64_t)PyBytes_GET_SIZE(a) > 0xffffffffu)
                return Py_NewRef(Py_None);
            size += 1 + 1 + 9 + 5 + PyBytes_GET_SIZE(a);
        } else if (kind == K_FAA) {
            if (!PyLong_CheckExact(a)) return Py_NewRef(Py_None);
            size += 1 + 1 + 9 + 9;
        } else {
            if (u64_of(a, &v) || (kind == K_CAS && u64_of(PyTuple_GET_ITEM(r, 3), &v)))
                return Py_NewRef(Py_None);
            size += 1 + 1 + 9 + 9 + (kind == K_CAS ? 9 : 0);
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    *o++ = 0x94;
    *o++ = 0x00;                                    /* VERBS */
    o = put_be(o, 0xcf, seq, 8);
    o = put_be(o, 0xcf, rkey, 8);
    o = put_be(o, 0xdd, (uint64_t)count, 4);
    static const unsigned char opcode[4] = {W_READ, W_WRITE, W_CAS, W_FAA};
    for (Py_ssize_t i = 0; i < count; i++) {       /* checked: nothing below can fail */
        PyObject *r = REQUEST(i);
        int kind = 0;
        while ((PyObject *)Py_TYPE(r) != PyTuple_GET_ITEM(kinds, kind)) kind++;
        uint64_t v = 0;
        *o++ = kind == K_CAS ? 0x94 : 0x93;
        *o++ = opcode[kind];
        u64_of(PyTuple_GET_ITEM(r, 1), &v);
        o = put_be(o, 0xcf, v, 8);
        PyObject *a = PyTuple_GET_ITEM(r, 2);
        if (kind == K_WRITE) {
            Py_ssize_t len = PyBytes_GET_SIZE(a);
            o = put_be(o, 0xc6, (uint64_t)len, 4);
            memcpy(o, PyBytes_AS_STRING(a), len);
            o += len;
        } else if (kind == K_FAA) {
            v = (uint64_t)PyLong_AsUnsignedLongLongMask(a);       /* wraps, as FAA does */
            o = put_be(o, 0xcf, v, 8);
        } else {
            u64_of(a, &v);
            o = put_be(o, 0xcf, v, 8);
            if (kind == K_CAS) {
                u64_of(PyTuple_GET_ITEM(r, 3), &v);
                o = put_be(o, 0xcf, v, 8);
            }
        }
    }
#undef REQUEST
    assert(o == (unsigned char *)PyBytes_AS_STRING(out) + size);
    return out;
}

/* group(batch, kinds, regions, counts) -> {node: [position, ...]}, or None.
 *
 * The zmq client's batch of verbs of several operations in flight, sorted out per memory
 * node in one pass: the positions of each node's requests in posting order (its message,
 * ``pack`` with positions) and the batch counted into ``counts`` as ``run`` counts it. Done
 * in Python, those per-verb loops (count, group, pick each node's requests) cost more than
 * the messages. Only a list of Read, Write (of bytes), Cas and Faa to nodes of ``regions``
 * whose Read lengths are unsigned 64-bit ints: anything else gives None with nothing
 * counted, and the caller's general path checks and counts it. ``kinds`` is (Read, Write,
 * Cas, Faa). */
static PyObject *group_verbs(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4 || !PyTuple_CheckExact(args[1]) || PyTuple_GET_SIZE(args[1]) != 4 ||
        !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "group(batch: list, kinds: tuple, regions: dict, counts)");
        return NULL;
    }
    if (!PyList_CheckExact(args[0])) return Py_NewRef(Py_None);
    PyObject *batch = args[0], *kinds = args[1], *regions = args[2];
    Py_ssize_t count = PyList_GET_SIZE(batch);
    long long delta[7] = {1, count, 0, 0, 0, 0, 0};
    PyObject *groups = PyDict_New();
    if (!groups) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(batch, i);
        int kind = -1;
        for (int k = 0; k < 4; k++)
            if ((PyObject *)Py_TYPE(r) == PyTuple_GET_ITEM(kinds, k)) kind = k;
        if (kind < 0 || PyTuple_GET_SIZE(r) != (kind == K_CAS ? 4 : 3)) goto general;
        PyObject *node = PyTuple_GET_ITEM(r, 0), *a = PyTuple_GET_ITEM(r, 2);
        if (!PyLong_CheckExact(node)) goto general;
        if (kind == K_READ) {
            uint64_t len;
            if (u64_of(a, &len)) goto general;
            delta[2]++;
            delta[5] += (long long)len;
        } else if (kind == K_WRITE) {
            if (!PyBytes_CheckExact(a)) goto general;
            delta[3]++;
            delta[6] += PyBytes_GET_SIZE(a);
        } else {
            delta[4]++;
        }
        PyObject *where = PyDict_GetItemWithError(groups, node);
        if (!where) {
            if (PyErr_Occurred()) goto fail;
            int known = PyDict_Contains(regions, node);
            if (known < 0) goto fail;
            if (!known) goto general;
            where = PyList_New(0);
            if (!where) goto fail;
            int set = PyDict_SetItem(groups, node, where);
            Py_DECREF(where);           /* the dict holds it */
            if (set < 0) goto fail;
        }
        PyObject *at = PyLong_FromSsize_t(i);
        if (!at) goto fail;
        int added = PyList_Append(where, at);
        Py_DECREF(at);
        if (added < 0) goto fail;
    }
    if (add_counts(args[3], delta) < 0) goto fail;
    return groups;
general:
    Py_DECREF(groups);
    return Py_NewRef(Py_None);
fail:
    Py_DECREF(groups);
    return NULL;
}

/* verb_new(cls, *fields) -> a ``cls`` (a NamedTuple of fusee.verbs) holding ``fields``.
 *
 * fusee.verbs installs it as the __new__ of Read, Write, Cas and Faa: a namedtuple's own
 * __new__ is a Python lambda, and building the dozen verbs of an update that way was about a
 * tenth of the client's CPU per operation. Same result, same TypeError on a wrong count of
 * fields (keywords are not taken: nothing builds a verb with them). */
static PyObject *str_fields;

static PyObject *verb_new(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n < 1 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "verb_new(cls, *fields): cls must be a tuple type");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    PyObject *fields = PyObject_GetAttr(args[0], str_fields);
    if (!fields) return NULL;
    Py_ssize_t want = PyTuple_Check(fields) ? PyTuple_GET_SIZE(fields) : -1;
    Py_DECREF(fields);
    if (want != n - 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     cls->tp_name, want, n - 1);
        return NULL;
    }
    PyObject *out = cls->tp_alloc(cls, want);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < want; i++)
        PyTuple_SET_ITEM(out, i, Py_NewRef(args[i + 1]));
    return out;
}

static PyMethodDef methods[] = {
    {"verb_new", (PyCFunction)(void (*)(void))verb_new, METH_FASTCALL,
     "verb_new(cls, *fields) -> a verb (see the C source)"},
    {"run", (PyCFunction)(void (*)(void))run_batch, METH_FASTCALL,
     "run(batch, table, regions, kinds, counts) -> completions, or None (see the C source)"},
    {"serve", (PyCFunction)(void (*)(void))serve_request, METH_FASTCALL,
     "serve(request, base, size, rkey, max_batch) -> (verbs, reply), or None (see the C source)"},
    {"unpack", unpack_reply, METH_O,
     "unpack(reply) -> (seq, completions, None), or None (see the C source)"},
    {"pack", (PyCFunction)(void (*)(void))pack_verbs, METH_FASTCALL,
     "pack(seq, rkey, batch, kinds, positions=None) -> the msgpack verbs request, or None "
     "(see the C source)"},
    {"group", (PyCFunction)(void (*)(void))group_verbs, METH_FASTCALL,
     "group(batch, kinds, regions, counts) -> {node: [position, ...]}, or None (see the C "
     "source)"},
    {"cas", (PyCFunction)(void (*)(void))atomic_cas, METH_FASTCALL, "cas(address, expected, desired) -> old"},
    {"faa", (PyCFunction)(void (*)(void))atomic_faa, METH_FASTCALL, "faa(address, delta) -> old"},
    {"load", atomic_load, METH_O, "load(address) -> value"},
    {"address", atomic_address, METH_O, "address(writable buffer) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_atomic",
                                    "8-byte hardware atomics on shared memory; the shm client's and the MN's batch of verbs", -1, methods};

static int add_object_methods(PyObject *module);  /* KV objects and bucket views: the end */
static int add_search_methods(PyObject *module);  /* a SEARCH's cache hit: before the end */
static int add_write_methods(PyObject *module);   /* the write path's verbs: before the end */
static int add_acyclic_methods(PyObject *module); /* long-lived objects untracked: before the end */
static int add_quiet_methods(PyObject *module);   /* an insert's quiet check: before the end */
static int add_shm_methods(PyObject *module);     /* the shm transport's execute: before the end */
static int add_crc_methods(PyObject *module);     /* crc32 folded with PCLMULQDQ: the end */
static int add_driver_methods(PyObject *module);  /* fusee.driver.run in C: before the end */
static int add_place_methods(PyObject *module);   /* zmq completions in order: the end */

PyMODINIT_FUNC PyInit__atomic(void) {
    if (!(str_rkey = PyUnicode_InternFromString("rkey"))) return NULL;
    if (!(str_fields = PyUnicode_InternFromString("_fields"))) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (add_object_methods(m) < 0 || add_search_methods(m) < 0 ||
              add_write_methods(m) < 0 || add_acyclic_methods(m) < 0 ||
              add_quiet_methods(m) < 0 || add_shm_methods(m) < 0 ||
              add_crc_methods(m) < 0 || add_driver_methods(m) < 0 ||
              add_place_methods(m) < 0)) Py_CLEAR(m);
    return m;
}

/* -- KV objects (fusee.layout): an object and a commit record made in one call each ------
 *
 * The byte formats are fusee.layout's (its docstring, and its Python functions of the same
 * names, which run where this extension is not built, and which tests/test_layout.py holds
 * these to). Made there, an object took a dozen Python-level calls (six of them crc32, each
 * costing about what the checksum of the whole 1 KB object does) and a commit record four:
 * about a twentieth of an UPDATE's client instructions (issue 12). */

/* crc32 with zlib's polynomial (reflected, 0xEDB88320) of a few bytes, continuing ``crc``
 * as zlib.crc32(data, crc) does: a commit record's 20 bytes, an object's opcode and seq. */
static uint32_t crc_table[256];             /* by byte: filled by add_object_methods */

static uint32_t crc32_bytes(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static void put_le(unsigned char *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* an unsigned int below 2**bits (bits <= 64), or -1 with OverflowError / TypeError set, as
 * the struct formats of fusee.layout refuse it */
static int get_field(PyObject *o, int bits, uint64_t *out) {
    uint64_t v;
    if (u64_of(o, &v)) {        /* (not an exact int below 2**64: refused there, with why) */
        v = PyLong_AsUnsignedLongLong(o);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    if (bits < 64 && v >> bits) {
        PyErr_SetString(PyExc_OverflowError, "a field of a KV object is out of range");
        return -1;
    }
    *out = v;
    return 0;
}

static int object_crc(PyObject *crc32, const unsigned char *p, Py_ssize_t log, uint64_t *crc);

/* encode_object(crc32, key, value, size, opcode, next_ptr, prev_ptr, seq) -> bytes
 *
 * fusee.layout.encode_object (``seq`` already mod 2**16). ``crc32`` is the checksum of the
 * object up to its commit record (ISA-L's, which layout uses: fast on a whole object), where
 * the CPU does not fold it here (``object_crc``); the opcode and seq bytes are added here. */
static PyObject *encode_object(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 8 || !PyBytes_Check(args[1]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_object(crc32, key: bytes, value: bytes, size, "
                        "opcode, next_ptr, prev_ptr, seq)");
        return NULL;
    }
    uint64_t size, opcode, next, prev, seq;
    if (get_field(args[3], 32, &size) || get_field(args[4], 8, &opcode) ||
        get_field(args[5], 64, &next) || get_field(args[6], 64, &prev) ||
        get_field(args[7], 16, &seq)) return NULL;
    Py_ssize_t klen = PyBytes_GET_SIZE(args[1]), vlen = PyBytes_GET_SIZE(args[2]);
    if (klen > 0xFFFF || (uint64_t)vlen > 0xFFFFFFFFu || size < 48 ||
        (uint64_t)(8 + klen + vlen) > size - 48) {
        PyErr_SetString(PyExc_ValueError, "the key and value do not fit an object of that size");
        return NULL;
    }
    Py_ssize_t log = (Py_ssize_t)size - 48;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    p[0] = 0xFE;
    p[1] = 0;
    put_le(p + 2, (uint64_t)klen, 2);
    put_le(p + 4, (uint64_t)vlen, 4);
    memcpy(p + 8, PyBytes_AS_STRING(args[1]), klen);
    memcpy(p + 8 + klen, PyBytes_AS_STRING(args[2]), vlen);
    memset(p + 8 + klen + vlen, 0, log - 8 - klen - vlen);
    put_le(p + log, next, 8);
    put_le(p + log + 8, prev, 8);
    memset(p + log + 16, 0, 24);                /* the commit record: pending */
    p[log + 40] = (unsigned char)opcode;
    put_le(p + log + 41, seq, 2);
    uint64_t crc;
    if (object_crc(args[0], p, log, &crc) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    put_le(p + log + 43, crc32_bytes((uint32_t)crc, p + log + 40, 3), 4);
    p[log + 47] = 1;                            /* used */
    return out;
}

/* commit_record(ref, old, state, old_crc, number) -> the record's 24 bytes
 * (fusee.layout.commit_record) */
static PyObject *commit_record(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t ref, old, state, old_crc, number;
    if (n != 5) {
        PyErr_SetString(PyExc_TypeError, "commit_record(ref, old, state, old_crc, number)");
        return NULL;
    }
    if (get_field(args[0], 48, &ref) || get_field(args[1], 64, &old) ||
        get_field(args[2], 8, &state) || get_field(args[3], 32, &old_crc) ||
        get_field(args[4], 64, &number)) return NULL;
    unsigned char rec[24];
    put_le(rec, ref | (number & 0xFF) << 48 | state << 56, 8);
    put_le(rec + 8, old, 8);
    put_le(rec + 16, old_crc, 4);
    put_le(rec + 20, crc32_bytes(0, rec, 20), 4);
    return PyBytes_FromStringAndSize((const char *)rec, 24);
}

static uint64_t get_le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* where the log entry of the ``len`` bytes at ``p`` starts, with the key's and the value's
 * lengths, when they hold a valid, used object (the crc aside); else -1 */
static Py_ssize_t object_extent_of(const unsigned char *p, Py_ssize_t len, Py_ssize_t *klen,
                                   Py_ssize_t *vlen) {
    Py_ssize_t log = len - 48;
    if (log < 8 || p[0] != 0xFE) return -1;
    *klen = (Py_ssize_t)get_le(p + 2, 2);
    *vlen = (Py_ssize_t)get_le(p + 4, 4);
    if (8 + *klen + *vlen > log || p[log + 47] != 1) return -1;
    return log;
}

static int crc32_folded(uint32_t crc, const unsigned char *p, size_t n, uint32_t *out); /* the end */

/* ``crc32``(the object up to its commit record) in ``*crc``: 0, or -1 with an error set;
 * computed here where the CPU folds it (crc32_folded), else by ``crc32`` */
static int object_crc(PyObject *crc32, const unsigned char *p, Py_ssize_t log, uint64_t *crc) {
    uint32_t folded;
    if (crc32_folded(0, p, (size_t)log + 16, &folded)) {
        *crc = folded;
        return 0;
    }
    PyObject *view = PyMemoryView_FromMemory((char *)p, log + 16, PyBUF_READ);
    PyObject *got = view ? PyObject_CallOneArg(crc32, view) : NULL;
    Py_XDECREF(view);
    int r = !got || get_field(got, 32, crc) ? -1 : 0;
    Py_XDECREF(got);
    return r;
}

/* decode_object(crc32, cls, buf: bytes) -> a ``cls`` (fusee.layout.ObjectView) or None:
 * fusee.layout.decode_object, an object read whole parsed and verified (its crc by the
 * caller's ``crc32`` up to the commit record, the rest here; a torn commit record reads as
 * pending). */
static PyObject *decode_object(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3 || !PyType_Check(args[1]) || !PyBytes_Check(args[2]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "decode_object(crc32, cls: a tuple type, buf: bytes)");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    Py_ssize_t klen, vlen, log = object_extent_of(p, PyBytes_GET_SIZE(args[2]), &klen, &vlen);
    if (log < 0) Py_RETURN_NONE;
    uint64_t crc;
    if (object_crc(args[0], p, log, &crc) < 0) return NULL;
    if (crc32_bytes((uint32_t)crc, p + log + 40, 3) != get_le(p + log + 43, 4)) Py_RETURN_NONE;
    uint64_t rec = get_le(p + log + 16, 8), old = get_le(p + log + 24, 8);
    uint64_t old_crc = get_le(p + log + 32, 4), state = rec >> 56;
    if (state != 0 && crc32_bytes(0, p + log + 16, 20) != get_le(p + log + 36, 4))
        state = rec = old = old_crc = 0;        /* torn: pending */
    PyTypeObject *cls = (PyTypeObject *)args[1];
    PyObject *out = cls->tp_alloc(cls, 12);
    if (!out) return NULL;
    PyObject *items[12] = {
        PyBytes_FromStringAndSize((const char *)p + 8, klen),
        PyBytes_FromStringAndSize((const char *)p + 8 + klen, vlen),
        PyLong_FromUnsignedLong(p[log + 40]),
        PyLong_FromUnsignedLongLong(get_le(p + log, 8)),
        PyLong_FromUnsignedLongLong(get_le(p + log + 8, 8)),
        PyLong_FromUnsignedLongLong(get_le(p + log + 41, 2)),
        PyLong_FromUnsignedLongLong(state),
        PyLong_FromUnsignedLongLong(rec & 0xFFFFFFFFFFFFull),
        PyLong_FromUnsignedLongLong(old),
        PyLong_FromUnsignedLongLong(old_crc),
        PyLong_FromUnsignedLongLong(rec >> 48 & 0xFF),
        PyLong_FromUnsignedLongLong(get_le(p + log + 43, 4)),
    };
    int ok = 1;
    for (int i = 0; i < 12; i++) {
        if (!items[i]) ok = 0;
        PyTuple_SET_ITEM(out, i, items[i] ? items[i] : Py_NewRef(Py_None));
    }
    if (!ok) { Py_DECREF(out); return NULL; }
    return out;
}

static PyMethodDef object_methods[] = {
    {"encode_object", (PyCFunction)(void (*)(void))encode_object, METH_FASTCALL,
     "encode_object(crc32, key, value, size, opcode, next_ptr, prev_ptr, seq) -> bytes"},
    {"commit_record", (PyCFunction)(void (*)(void))commit_record, METH_FASTCALL,
     "commit_record(ref, old, state, old_crc, number) -> bytes"},
    {"decode_object", (PyCFunction)(void (*)(void))decode_object, METH_FASTCALL,
     "decode_object(crc32, cls, buf) -> cls(...) or None"},
    {NULL, NULL, 0, NULL},
};


/* -- A key's two combined buckets (fusee.index.View) read in one call each -----------------
 *
 * ``raw`` is the 256 bytes of a View: 4 buckets of a header word and 7 slot words; word i
 * (i % 8 != 0) is the slot at position (firsts[i / 16] + i / 8 % 2) * 7 + i % 8 - 1. The
 * formats and the answers are View's Python methods' (fusee/index.py, the spec, which runs
 * where this extension is not built; tests/test_index.py holds these to them). Made there,
 * one insert's free slot and duplicate check cost about a sixth of its client instructions
 * (issue 12): a Python call per slice, translate and int.from_bytes. */

#define VIEW_BYTES 256

static const unsigned char *view_raw(PyObject *o) {
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) != VIEW_BYTES) {
        PyErr_SetString(PyExc_TypeError, "a View's raw bytes: the 256 bytes of two combined buckets");
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(o);
}

static uint64_t word_at(const unsigned char *raw, int i) {
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--) v = v << 8 | raw[8 * i + b];
    return v;
}

/* append ``item`` (a new reference, or NULL: an error is set) to ``list``, and drop it */
static int append_new(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

static long long word_pos(long long f0, long long f1, int i) {
    return ((i < 16 ? f0 : f1) + (i >> 3 & 1)) * 7 + (i & 7) - 1;
}

/* view_free_slot(raw, first, second, skip) -> position or None: View.free_slot, ``first``
 * and ``second`` the positions of the first slots of the two combined buckets, ``skip``
 * a mask of the words not to take (bit i: word i). */
static PyObject *view_free_slot(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4) { PyErr_SetString(PyExc_TypeError, "view_free_slot(raw, first, second, skip)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]);
    if (!raw) return NULL;
    long long first = PyLong_AsLongLong(args[1]), second = PyLong_AsLongLong(args[2]);
    unsigned long long skip = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    long long best = -1;
    int most = 0;
    for (int k = 0; k < 4; k++) {
        long long at = (k < 2 ? first : second) + 7 * (k & 1);
        int free = 0, lowest = -1;
        for (int s = 0; s < 7; s++) {
            int i = 8 * k + 1 + s;
            /* TAKEN: the length (byte 6), FROZEN or TENTATIVE (the top bits of byte 5) */
            if (raw[8 * i + 6] || raw[8 * i + 5] & 0xC0 || skip >> i & 1) continue;
            free++;
            if (lowest < 0) lowest = s;
        }
        if (free && free >= most) {
            long long pos = at + lowest;
            if (free > most || pos < best) { best = pos; most = free; }
        }
    }
    if (!most) Py_RETURN_NONE;
    return PyLong_FromLongLong(best);
}

/* view_matches(raw, theirs, fp, f0, f1, skip): the slots whose fingerprint byte is ``fp``.
 * With ``theirs`` None, View.candidates: [(position, value)] of the committed objects (a
 * length, neither TENTATIVE nor FROZEN). With ``theirs`` (a second read of the same
 * buckets), View.pairs: [(position, value here, value there)] of the slots but position
 * ``skip`` whose fingerprint byte is ``fp`` in either read. */
static PyObject *view_matches(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) { PyErr_SetString(PyExc_TypeError, "view_matches(raw, theirs, fp, f0, f1, skip)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]), *theirs = NULL;
    if (!raw || (args[1] != Py_None && !(theirs = view_raw(args[1])))) return NULL;
    long long fp = PyLong_AsLongLong(args[2]), f0 = PyLong_AsLongLong(args[3]);
    long long f1 = PyLong_AsLongLong(args[4]), skip = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int i = 1; i < 32; i++) {
        if (!(i & 7)) continue;                 /* a bucket header */
        long long pos = word_pos(f0, f1, i);
        PyObject *item;
        if (!theirs) {
            if (raw[8 * i + 7] != fp || !raw[8 * i + 6] || raw[8 * i + 5] & 0xC0) continue;
            item = Py_BuildValue("(LK)", pos, (unsigned long long)word_at(raw, i));
        } else {
            if ((raw[8 * i + 7] != fp && theirs[8 * i + 7] != fp) || pos == skip) continue;
            item = Py_BuildValue("(LKK)", pos, (unsigned long long)word_at(raw, i),
                                 (unsigned long long)word_at(theirs, i));
        }
        if (append_new(out, item) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* view_differs(raw, theirs, f0, f1, skip) -> bool: View.differs, some slot but position
 * ``skip`` holds different values in the two reads. */
static PyObject *view_differs(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 5) { PyErr_SetString(PyExc_TypeError, "view_differs(raw, theirs, f0, f1, skip)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]), *theirs = raw ? view_raw(args[1]) : NULL;
    if (!theirs) return NULL;
    long long f0 = PyLong_AsLongLong(args[2]), f1 = PyLong_AsLongLong(args[3]);
    long long skip = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    for (int i = 1; i < 32; i++)
        if ((i & 7) && word_pos(f0, f1, i) != skip && memcmp(raw + 8 * i, theirs + 8 * i, 8))
            Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* a bucket header names another subtable than ``sid`` or is RETIRED (flags, byte 5), or a
 * slot word is FROZEN (the top bit of its byte 5) */
static int raw_stale(const unsigned char *raw, long long sid) {
    for (int i = 0; i < 32; i += 8)
        if ((raw[8 * i + 6] | raw[8 * i + 7] << 8) != sid || raw[8 * i + 5] & 1) return 1;
    for (int i = 1; i < 32; i++)
        if ((i & 7) && raw[8 * i + 5] & 0x80) return 1;
    return 0;
}

/* view_stale(raw, sid) -> bool: View.stale, a bucket header names another subtable or is
 * RETIRED (flags, byte 5), or a slot word is FROZEN (the top bit of its byte 5). */
static PyObject *view_stale(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "view_stale(raw, sid)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]);
    if (!raw) return NULL;
    long long sid = PyLong_AsLongLong(args[1]);
    if (sid == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(raw_stale(raw, sid));
}

/* the word of the View holding slot ``pos``, or -1 when it holds none */
static int view_word(long long f0, long long f1, long long pos) {
    if (pos < 0) return -1;
    long long b = pos / 7, s = pos % 7, at;
    if (b - f0 >= 0 && b - f0 < 2) at = b - f0;
    else if (b - f1 >= 0 && b - f1 < 2) at = b - f1 + 2;
    else return -1;
    return (int)(8 * at + 1 + s);
}

/* view_get(raw, f0, f1, pos) -> the value of slot ``pos``, or None when the view does not
 * hold it: View.get */
static PyObject *view_get(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4) { PyErr_SetString(PyExc_TypeError, "view_get(raw, f0, f1, pos)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]);
    if (!raw) return NULL;
    long long f0 = PyLong_AsLongLong(args[1]), f1 = PyLong_AsLongLong(args[2]);
    long long pos = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    int word = view_word(f0, f1, pos);
    if (word < 0) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(word_at(raw, word));
}

static PyMethodDef view_methods[] = {
    {"view_free_slot", (PyCFunction)(void (*)(void))view_free_slot, METH_FASTCALL,
     "view_free_slot(raw, first, second, skip) -> position or None (fusee.index.View)"},
    {"view_matches", (PyCFunction)(void (*)(void))view_matches, METH_FASTCALL,
     "view_matches(raw, theirs, fp, f0, f1, skip) -> [(position, value(s))] (fusee.index.View)"},
    {"view_stale", (PyCFunction)(void (*)(void))view_stale, METH_FASTCALL,
     "view_stale(raw, sid) -> bool (fusee.index.View)"},
    {"view_get", (PyCFunction)(void (*)(void))view_get, METH_FASTCALL,
     "view_get(raw, f0, f1, pos) -> value or None (fusee.index.View)"},
    {"view_differs", (PyCFunction)(void (*)(void))view_differs, METH_FASTCALL,
     "view_differs(raw, theirs, f0, f1, skip) -> bool (fusee.index.View)"},
    {NULL, NULL, 0, NULL},
};

/* the two blocks above, added to the module by PyInit__atomic */
static int add_object_methods(PyObject *module) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        crc_table[b] = c;
    }
    if (PyModule_AddFunctions(module, object_methods) < 0) return -1;
    return PyModule_AddFunctions(module, view_methods);
}

/* -- A SEARCH's cache hit (fusee.search.first_answer) judged in one call -----------------
 *
 * A SEARCH that speculates on its index cache entry reads the key's two combined buckets and
 * the cached object in one round trip; it is a hit when the buckets are not stale, the
 * entry's slot still holds the entry's value, the object decodes (header, used byte, crc),
 * holds the key and has the slot value's generation (fusee.reuse.is_named). Judged in Python
 * that was a View (a join, a stale test, a slot read) and an ObjectView of 12 fields built for
 * one of them: about half of a hit's client instructions (issue 12). fusee.search.hit_value is
 * the spec and the fallback; tests/test_search_hit.py holds the two to the same answers. */

/* the bytes of a bytes-like ``o`` appended at ``dst + *at`` (at most ``cap`` in all): 0 ok,
 * -1 not a contiguous buffer or too long (no error left set) */
static int append_buffer(PyObject *o, unsigned char *dst, Py_ssize_t *at, Py_ssize_t cap) {
    Py_buffer b;
    if (PyObject_GetBuffer(o, &b, PyBUF_SIMPLE) < 0) { PyErr_Clear(); return -1; }
    int ok = b.len <= cap - *at;
    if (ok) { memcpy(dst + *at, b.buf, b.len); *at += b.len; }
    PyBuffer_Release(&b);
    return ok ? 0 : -1;
}

/* search_hit(crc32, buckets, buckets, obj, f0, f1, sid, pos, value, key) -> the value bytes
 * on a hit, else None (go on: fusee.search.first_answer judges the round in Python).
 * ``crc32`` checks the object up to its commit record, as decode_object's does. */
static PyObject *search_hit(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "search_hit(crc32, buckets, buckets, obj, f0, f1, sid, pos, value, key)");
        return NULL;
    }
    unsigned char raw[VIEW_BYTES];
    Py_ssize_t got = 0;
    if (append_buffer(args[1], raw, &got, VIEW_BYTES) || append_buffer(args[2], raw, &got, VIEW_BYTES)
        || got != VIEW_BYTES || !PyBytes_Check(args[9])) Py_RETURN_NONE;
    long long f0 = PyLong_AsLongLong(args[4]), f1 = PyLong_AsLongLong(args[5]);
    long long sid = PyLong_AsLongLong(args[6]), pos = PyLong_AsLongLong(args[7]);
    uint64_t value;
    if (PyErr_Occurred()) { PyErr_Clear(); Py_RETURN_NONE; }
    if (u64_of(args[8], &value)) Py_RETURN_NONE;     /* no slot holds it */
    int word = view_word(f0, f1, pos);
    if (raw_stale(raw, sid) || word < 0 || word_at(raw, word) != value) Py_RETURN_NONE;
    Py_buffer b;
    if (PyObject_GetBuffer(args[3], &b, PyBUF_SIMPLE) < 0) { PyErr_Clear(); Py_RETURN_NONE; }
    const unsigned char *p = (const unsigned char *)b.buf;
    Py_ssize_t klen, vlen, log = object_extent_of(p, b.len, &klen, &vlen);
    PyObject *out = NULL;
    if (log < 0 || klen != PyBytes_GET_SIZE(args[9]) ||
        memcmp(p + 8, PyBytes_AS_STRING(args[9]), klen) ||
        p[log + 41] != (value >> 32 & 0xFF)) goto none;        /* seq mod 256: the generation */
    uint64_t crc;
    if (object_crc(args[0], p, log, &crc) < 0) goto done;
    if (crc32_bytes((uint32_t)crc, p + log + 40, 3) != get_le(p + log + 43, 4)) goto none;
    out = PyBytes_FromStringAndSize((const char *)p + 8 + klen, vlen);
    goto done;
none:
    out = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef search_methods[] = {
    {"search_hit", (PyCFunction)(void (*)(void))search_hit, METH_FASTCALL,
     "search_hit(crc32, buckets, buckets, obj, f0, f1, sid, pos, value, key) -> value or None "
     "(fusee.search)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_search_methods(PyObject *module) {
    return PyModule_AddFunctions(module, search_methods);
}

/* -- The write path's verbs (fusee.log, fusee.index): the same verb to every replica, and a
 * key's bucket reads, one call each -------------------------------------------------------
 *
 * An object's writes and each of its commit records go to every live copy of its group, at
 * the same address on each (fusee.allocation: a group's blocks share their offsets). Made in
 * Python, each list was a comprehension (a function object made and called) and a verb per
 * copy built through the class call (type_call, slot_tp_new, the verb_new staticmethod): a
 * few percent of an UPDATE's client instructions (issue 12). fusee.log's Python fallback
 * makes the same list where this extension is not built (tests/test_layout.py). */

/* A verb (or KeyHash) whose fields are all ints or bytes can be in no reference cycle: it is
 * taken off the garbage collector's lists, as CPython does for a plain tuple of ints at its
 * first collection (a tuple subclass it never does). A client keeps tens of thousands of
 * them (fusee.index's bucket reads, fusee.hashing's memo), and each full collection walked
 * every one: ~16% of a load phase's CPU (issue 12). */
static void untrack_if_atomic(PyObject *t) {
    for (Py_ssize_t k = PyTuple_GET_SIZE(t); k-- > 0;)
        if (PyObject_IS_GC(PyTuple_GET_ITEM(t, k))) return;
    PyObject_GC_UnTrack(t);
}

/* verbs_to(cls, nodes, addr, data) -> [cls(node, addr, data) for node in nodes]: ``cls`` a
 * tuple type of three fields (fusee.verbs.Write), ``nodes`` a list or tuple */
static PyObject *verbs_to(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "verbs_to(cls, nodes, addr, data): cls a tuple type");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    PyObject *fields = PyObject_GetAttr(args[0], str_fields);
    Py_ssize_t want = fields && PyTuple_Check(fields) ? PyTuple_GET_SIZE(fields) : -1;
    Py_XDECREF(fields);
    if (want != 3) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "verbs_to: %s does not have 3 fields", cls->tp_name);
        return NULL;
    }
    PyObject *nodes = PySequence_Fast(args[1], "verbs_to: nodes must be a list or a tuple");
    if (!nodes) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(nodes);
    PyObject *out = PyList_New(count);
    if (!out) { Py_DECREF(nodes); return NULL; }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *verb = cls->tp_alloc(cls, 3);
        if (!verb) { Py_DECREF(out); Py_DECREF(nodes); return NULL; }
        PyTuple_SET_ITEM(verb, 0, Py_NewRef(PySequence_Fast_GET_ITEM(nodes, i)));
        PyTuple_SET_ITEM(verb, 1, Py_NewRef(args[2]));
        PyTuple_SET_ITEM(verb, 2, Py_NewRef(args[3]));
        untrack_if_atomic(verb);
        PyList_SET_ITEM(out, i, verb);
    }
    Py_DECREF(nodes);
    return out;
}

/* bucket_reads(cls, node, high, mains, base, bucket_bytes) -> ((read, read), (f1, f2)):
 * fusee.index.Directory's reads of a key's two combined buckets on MN ``node`` in the
 * subtable at ``base``, made of the key hash's ``high`` word (KeyHash.mains over ``mains``
 * main buckets, IndexGeometry.combined for each); ``cls`` the Read verb. Made in Python for
 * every key not used lately (an insert's), that was a dozen calls (issue 12); the Python
 * stays the spec and the fallback, tests/test_index.py holds the two equal. */
static PyObject *bucket_reads(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError,
                        "bucket_reads(cls, node, high, mains, base, bucket_bytes): cls a tuple type");
        return NULL;
    }
    unsigned long long high = PyLong_AsUnsignedLongLong(args[2]);
    long long mains = PyLong_AsLongLong(args[3]);
    unsigned long long base = PyLong_AsUnsignedLongLong(args[4]);
    long long bucket = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (mains < 1 || bucket < 1) {
        PyErr_SetString(PyExc_ValueError, "bucket_reads: mains and bucket_bytes must be positive");
        return NULL;
    }
    unsigned long long m1 = (high & 0xFFFFFFFFull) % (unsigned long long)mains;
    unsigned long long m2 = (high >> 32) % (unsigned long long)mains;
    if (mains > 2 && m2 / 2 == m1 / 2) m2 = (m2 + 2) % (unsigned long long)mains;
    unsigned long long first[2] = {3 * (m1 / 2) + m1 % 2, 3 * (m2 / 2) + m2 % 2};
    PyTypeObject *cls = (PyTypeObject *)args[0];
    PyObject *reads = PyTuple_New(2), *firsts = PyTuple_New(2), *out = NULL;
    if (!reads || !firsts) goto done;
    for (int i = 0; i < 2; i++) {
        unsigned long long offset = first[i] * (unsigned long long)bucket;
        if (offset > ULLONG_MAX - base) {
            PyErr_SetString(PyExc_OverflowError, "bucket_reads: an address past 64 bits");
            goto done;
        }
        PyObject *f = PyLong_FromUnsignedLongLong(first[i]);
        if (!f) goto done;
        PyTuple_SET_ITEM(firsts, i, f);
        PyObject *read = cls->tp_alloc(cls, 3);
        if (!read) goto done;
        PyTuple_SET_ITEM(reads, i, read);
        PyObject *addr = PyLong_FromUnsignedLongLong(base + offset);
        PyObject *length = PyLong_FromLongLong(2 * bucket);
        if (!addr || !length) { Py_XDECREF(addr); Py_XDECREF(length); goto done; }
        PyTuple_SET_ITEM(read, 0, Py_NewRef(args[1]));
        PyTuple_SET_ITEM(read, 1, addr);
        PyTuple_SET_ITEM(read, 2, length);
        PyObject_GC_UnTrack(read);      /* three ints */
    }
    /* all ints and untracked reads: CPython would keep the two tuples on the collector's
     * lists for good (it untracks a tuple only of objects that cannot be tracked at all) */
    PyObject_GC_UnTrack(reads);
    PyObject_GC_UnTrack(firsts);
    out = PyTuple_Pack(2, reads, firsts);
    if (out) PyObject_GC_UnTrack(out);
done:
    Py_XDECREF(reads);
    Py_XDECREF(firsts);
    return out;
}

/* verb_constructor(cls) -> None: calling ``cls`` (a verb of fusee.verbs, a NamedTuple)
 * builds it in this one C function, through the type's vectorcall slot. Its __new__ in C
 * (verb_new) still went through type_call, slot_tp_new (a lookup of __new__ and a
 * staticmethod call with a new argument tuple) and object_init: ~700 instructions a verb,
 * ~3.5k an update (issue 12). The result is the one verb_new makes; keywords or a wrong
 * count of fields go the class's ordinary way (type_call, its __new__), so their answers and
 * errors do not change; a verb of ints and bytes is untracked (untrack_if_atomic).
 * Installed last: setting a __new__ on the class afterwards would not reset it. */
#define VERB_TYPES 8
static PyTypeObject *verb_types[VERB_TYPES];
static Py_ssize_t verb_counts[VERB_TYPES];

static PyObject *verb_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    int i = 0;
    while (i < VERB_TYPES && verb_types[i] != (PyTypeObject *)callable) i++;
    if (i < VERB_TYPES && !kwnames && n == verb_counts[i]) {
        PyTypeObject *cls = (PyTypeObject *)callable;
        PyObject *out = cls->tp_alloc(cls, n);
        if (!out) return NULL;
        for (Py_ssize_t k = 0; k < n; k++) PyTuple_SET_ITEM(out, k, Py_NewRef(args[k]));
        untrack_if_atomic(out);
        return out;
    }
    /* the ordinary call: type_call with an argument tuple and a keyword dict */
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *pos = PyTuple_New(n), *kw = nkw ? PyDict_New() : NULL, *out = NULL;
    if (!pos || (nkw && !kw)) goto done;
    for (Py_ssize_t k = 0; k < n; k++) PyTuple_SET_ITEM(pos, k, Py_NewRef(args[k]));
    for (Py_ssize_t k = 0; k < nkw; k++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, k), args[n + k]) < 0) goto done;
    out = PyType_Type.tp_call(callable, pos, kw);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    return out;
}

static PyObject *verb_constructor(PyObject *self, PyObject *cls_obj) {
    if (!PyType_Check(cls_obj) || !PyType_IsSubtype((PyTypeObject *)cls_obj, &PyTuple_Type) ||
        !(((PyTypeObject *)cls_obj)->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
        PyErr_SetString(PyExc_TypeError, "verb_constructor(cls): cls must be a NamedTuple class");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)cls_obj;
    PyObject *fields = PyObject_GetAttr(cls_obj, str_fields);
    if (!fields) return NULL;
    Py_ssize_t want = PyTuple_Check(fields) ? PyTuple_GET_SIZE(fields) : -1;
    Py_DECREF(fields);
    if (want < 0) {
        PyErr_SetString(PyExc_TypeError, "verb_constructor(cls): cls._fields must be a tuple");
        return NULL;
    }
    int i = 0;
    while (i < VERB_TYPES && verb_types[i] && verb_types[i] != cls) i++;
    if (i == VERB_TYPES) {
        PyErr_SetString(PyExc_ValueError, "verb_constructor: too many classes");
        return NULL;
    }
    if (!verb_types[i]) verb_types[i] = (PyTypeObject *)Py_NewRef(cls_obj);
    verb_counts[i] = want;
    cls->tp_vectorcall = verb_vectorcall;
    Py_RETURN_NONE;
}

static PyMethodDef write_methods[] = {
    {"verb_constructor", verb_constructor, METH_O,
     "verb_constructor(cls) -> None: calling cls builds it in C (fusee.verbs)"},
    {"verbs_to", (PyCFunction)(void (*)(void))verbs_to, METH_FASTCALL,
     "verbs_to(cls, nodes, addr, data) -> [cls(node, addr, data) for node in nodes] (fusee.log)"},
    {"bucket_reads", (PyCFunction)(void (*)(void))bucket_reads, METH_FASTCALL,
     "bucket_reads(cls, node, high, mains, base, bucket_bytes) -> ((read, read), (f1, f2)) "
     "(fusee.index.Directory)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_write_methods(PyObject *module) {
    return PyModule_AddFunctions(module, write_methods);
}

/* -- A client's long-lived objects off the garbage collector's lists (fusee.acyclic) -----
 *
 * A client keeps tens of thousands of small objects for good: an index cache entry per key
 * (fusee.cache, up to 65,536) and a slot target per slot in recent use (fusee.operations, up
 * to 16,384). Each is a container to CPython, and every full collection walked every one: in
 * a load phase of 100,000 inserts, ~7 us of an insert's ~50 us of client CPU, and each new
 * entry brought the next full collection closer (issue 12). None can sit in a reference
 * cycle: their fields are ints, tuples of ints, and (a cache entry's hit_reads) objects that
 * never lead back to them. A Python class cannot say so; this does, checked when it is made.
 * fusee.acyclic's Python fallback (the extension not built) leaves them tracked: the same
 * behaviour, slower full collections. tests/test_acyclic.py holds this to its rule. */

/* a referent that cannot close a cycle through the object being judged: not a container,
 * a container the collector does not track, or a plain tuple of such (untracked here, as
 * CPython does at a tuple's first collection); ``arg`` is the object's type, skipped (a
 * class holds none of its instances) */
static int visit_acyclic(PyObject *o, void *arg) {
    if (o == arg || !PyObject_IS_GC(o) || !PyObject_GC_IsTracked(o)) return 0;
    if (!PyTuple_CheckExact(o)) return 1;
    for (Py_ssize_t k = PyTuple_GET_SIZE(o); k-- > 0;) {
        PyObject *item = PyTuple_GET_ITEM(o, k);
        if (PyObject_IS_GC(item) && PyObject_GC_IsTracked(item)) return 1;
    }
    PyObject_GC_UnTrack(o);
    return 0;
}

/* untracked(obj) -> obj: ``obj`` taken off the collector's lists when each of its referents
 * but its type passes visit_acyclic (then no cycle runs through it now, and its class must
 * keep it so: a field assigned later must never lead back to it); else left as it is */
static PyObject *untracked(PyObject *self, PyObject *obj) {
    if (PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj)) {
        traverseproc traverse = Py_TYPE(obj)->tp_traverse;
        if (traverse && traverse(obj, visit_acyclic, (void *)Py_TYPE(obj)) == 0)
            PyObject_GC_UnTrack(obj);
    }
    return Py_NewRef(obj);
}

static PyMethodDef acyclic_methods[] = {
    {"untracked", untracked, METH_O,
     "untracked(obj) -> obj, off the garbage collector's lists if nothing it holds but its "
     "type is a tracked container (fusee.acyclic)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_acyclic_methods(PyObject *module) {
    return PyModule_AddFunctions(module, acyclic_methods);
}

/* -- An insert's duplicate check with nothing to look at (fusee.index.View.quiet) ----------
 *
 * Most inserts find no other slot naming their key's fingerprint, and no slot but their own
 * moved between the primary's read and the claim MN's: ``_clear_at_once`` (fusee.insert)
 * asked View.pairs and View.differs, two calls into this extension and a list. One call. */

/* view_quiet(raw, theirs, fp, f0, f1, skip) -> bool: no slot but position ``skip`` holds
 * different values in the two reads or a fingerprint byte of ``fp`` (View.quiet: neither
 * View.pairs nor View.differs finds one) */
static PyObject *view_quiet(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) { PyErr_SetString(PyExc_TypeError, "view_quiet(raw, theirs, fp, f0, f1, skip)"); return NULL; }
    const unsigned char *raw = view_raw(args[0]), *theirs = raw ? view_raw(args[1]) : NULL;
    if (!theirs) return NULL;
    long long fp = PyLong_AsLongLong(args[2]), f0 = PyLong_AsLongLong(args[3]);
    long long f1 = PyLong_AsLongLong(args[4]), skip = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    for (int i = 1; i < 32; i++) {
        if (!(i & 7) || word_pos(f0, f1, i) == skip) continue;
        /* equal words: the fingerprint byte of one is the other's */
        if (memcmp(raw + 8 * i, theirs + 8 * i, 8) || raw[8 * i + 7] == fp) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef quiet_methods[] = {
    {"view_quiet", (PyCFunction)(void (*)(void))view_quiet, METH_FASTCALL,
     "view_quiet(raw, theirs, fp, f0, f1, skip) -> bool (fusee.index.View)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_quiet_methods(PyObject *module) {
    return PyModule_AddFunctions(module, quiet_methods);
}

/* -- The shm transport's execute (transports/shm.py) in one call ---------------------------
 *
 * Every batch an operation posts on shm went through ShmTransport.execute, a Python method:
 * its checks (a batch, not too long, the liveness poll due?) and the call of ``run`` cost
 * about as many instructions as ``run`` itself, a tenth of a SEARCH's cache hit (issue 12).
 * ``shm_execute`` makes the same checks in C, in the same order (the liveness poll, when
 * due, by the transport's ``_check_liveness``), and runs the common case (``run``); anything
 * else, it hands to the Python method, which does it all again (``run`` left the batch
 * untouched): an empty batch, one too long, a request ``run`` does not take. ShmTransport
 * binds it as its instances' ``execute`` (``shm_executor``). */

static PyObject *str_check_liveness;

/* ``fast`` is the transport's ``_fast``: [_next_check, _table, regions, stats.counts], the
 * attributes the C execute reads on every batch, kept there by the transport's properties
 * (the only way to set them), read here by position: no attribute looked up by name */
static int fast_ok(PyObject *fast) {
    if (PyList_CheckExact(fast) && PyList_GET_SIZE(fast) == 4) return 1;
    PyErr_SetString(PyExc_TypeError, "the shm transport's _fast is a list of 4 items");
    return 0;
}

/* run(batch, transport._table, transport.regions, kinds, transport.stats.counts), or NULL
 * with an error set */
static PyObject *run_on(PyObject *fast, PyObject *batch, PyObject *kinds) {
    PyObject *table = Py_NewRef(PyList_GET_ITEM(fast, 1));
    PyObject *regions = Py_NewRef(PyList_GET_ITEM(fast, 2));
    PyObject *counts = Py_NewRef(PyList_GET_ITEM(fast, 3));
    PyObject *args[5] = {batch, table, regions, kinds, counts};
    PyObject *done = run_batch(NULL, args, 5);
    Py_DECREF(table); Py_DECREF(regions); Py_DECREF(counts);
    return done;
}

/* shm_execute(transport, general, max_batch, kinds, fast, batch) -> completions: when
 * ``batch`` is a list of 1 to ``max_batch`` requests, ``transport._check_liveness(now)`` if
 * time.monotonic() has reached ``transport._next_check``, then ``run`` if it takes the
 * batch; else ``general(transport, batch)`` (the Python execute, unbound). */
static PyObject *shm_execute(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "shm_execute(transport, general, max_batch, kinds, fast, batch)");
        return NULL;
    }
    PyObject *transport = args[0], *fast = args[4], *batch = args[5];
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (!fast_ok(fast)) return NULL;
    if (PyList_CheckExact(batch) && PyList_GET_SIZE(batch) > 0 &&
        PyList_GET_SIZE(batch) <= limit) {
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {     /* time.monotonic()'s clock */
            double now = (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
            PyObject *next = PyList_GET_ITEM(fast, 0);
            double due = PyFloat_CheckExact(next) ? PyFloat_AS_DOUBLE(next)
                                                  : PyFloat_AsDouble(next);
            if (due == -1.0 && PyErr_Occurred()) return NULL;
            if (now >= due) {           /* the poll first, as the Python method does */
                PyObject *at = PyFloat_FromDouble(now);
                PyObject *polled = at ? PyObject_CallMethodOneArg(transport, str_check_liveness,
                                                                  at) : NULL;
                Py_XDECREF(at);
                if (!polled) return NULL;
                Py_DECREF(polled);
                if (!fast_ok(fast)) return NULL;
            }
            PyObject *done = run_on(fast, batch, args[3]);
            if (done != Py_None) return done;           /* completions, or NULL: an error */
            Py_DECREF(done);
        }
    }
    PyObject *both[2] = {transport, batch};         /* general(transport, batch) */
    return PyObject_Vectorcall(args[1], both, 2, NULL);
}

/* the function ``shm_executor`` makes: ``shm_execute(*state, batch)``, its ``self`` the
 * state tuple (a call with no partial's arguments to copy) */
static PyObject *shm_bound(PyObject *state, PyObject *const *args, Py_ssize_t n) {
    if (n != 1 || !PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 5) {
        PyErr_SetString(PyExc_TypeError, "execute(batch)");
        return NULL;
    }
    /* the transport, held weakly: a strong reference would make transport -> execute ->
     * state -> transport a cycle, and an unclosed transport (its mappings, its pidfds) would
     * wait for the cycle collector */
    PyObject *transport = PyWeakref_GetObject(PyTuple_GET_ITEM(state, 0));
    if (!transport) return NULL;
    if (transport == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "the shm transport is gone");
        return NULL;
    }
    Py_INCREF(transport);
    PyObject *all[6] = {transport, PyTuple_GET_ITEM(state, 1), PyTuple_GET_ITEM(state, 2),
                        PyTuple_GET_ITEM(state, 3), PyTuple_GET_ITEM(state, 4), args[0]};
    PyObject *done = shm_execute(NULL, all, 6);
    Py_DECREF(transport);
    return done;
}

/* ``def``'s function with ``state`` (a new reference, or NULL with an error set: passed on)
 * as its ``self``: state bound into a C function, without a partial's arguments to copy */
static PyObject *with_state(PyMethodDef *def, PyObject *state) {
    PyObject *bound = state ? PyCFunction_New(def, state) : NULL;
    Py_XDECREF(state);
    return bound;
}

static PyMethodDef shm_bound_def = {
    "execute", (PyCFunction)(void (*)(void))shm_bound, METH_FASTCALL,
    "execute(batch) -> completions: the shm transport's, in C (transports/shm.py)"};

/* shm_executor(transport, general, max_batch, kinds, fast) -> execute(batch), which runs
 * ``shm_execute(transport, general, max_batch, kinds, fast, batch)``, ``transport`` held
 * weakly and ``general`` the class's function (no reference cycle through the instance) */
static PyObject *shm_executor(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "shm_executor(transport, general, max_batch, kinds, fast)");
        return NULL;
    }
    if (!fast_ok(args[4])) return NULL;
    PyObject *ref = PyWeakref_NewRef(args[0], NULL);
    PyObject *bound = with_state(&shm_bound_def, ref ? PyTuple_Pack(5, ref, args[1], args[2],
                                                                    args[3], args[4]) : NULL);
    Py_XDECREF(ref);
    return bound;
}

static PyMethodDef shm_methods[] = {
    {"shm_executor", (PyCFunction)(void (*)(void))shm_executor, METH_FASTCALL,
     "shm_executor(transport, general, max_batch, kinds, fast) -> execute(batch), in C "
     "(transports/shm.py)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_shm_methods(PyObject *module) {
    if (!(str_check_liveness = PyUnicode_InternFromString("_check_liveness"))) return -1;
    return PyModule_AddFunctions(module, shm_methods);
}

/* -- crc32 of a whole object, folded with carry-less multiplies (x86-64 PCLMULQDQ) --------
 *
 * Every object a SEARCH's cache hit reads is checked by its crc32 (zlib's polynomial) over
 * the ~1 KB up to its commit record (object_crc). Through ISA-L's Python function that was
 * a memoryview made, a Python call, an int made and read: ~1.9k instructions a hit, more
 * than half of them around the checksum (issue 12). Folded here, 64 bytes per step, as in
 * "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction" (Gopal, Ozturk
 * et al., Intel, 2009; the bit-reflected constants of its appendix, as zlib's and Linux's
 * x86 crc32 use them); the bytes past the last 16-byte block by crc32_bytes. Where the CPU
 * cannot (no PCLMULQDQ, or not x86-64), object_crc calls ``crc32`` as before. ``crc32``
 * (below) is the same function for tests/test_crc.py, which holds it to zlib.crc32. */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* the crc register (inverted, as zlib keeps it) after ``len`` bytes: 64 or more, a
 * multiple of 16 */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc32_clmul(const unsigned char *buf, size_t len, uint32_t crc) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = k1k2;
    buf += 64;
    len -= 64;
    while (len >= 64) {                     /* four lanes, folded 64 bytes ahead */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        len -= 64;
    }
    x0 = k3k4;                              /* the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (len >= 16) {                     /* the 16-byte blocks left */
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);        /* 128 bits to 64 */
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x0 = k5k0;
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    x0 = poly;                                      /* Barrett's reduction to 32 bits */
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int clmul_cpu = -1;                  /* whether the CPU has it: asked once */
#endif

/* zlib.crc32(bytes n at p, crc) in ``*out`` -> 1, where the CPU folds it; else 0 */
static int crc32_folded(uint32_t crc, const unsigned char *p, size_t n, uint32_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (clmul_cpu < 0) {
        __builtin_cpu_init();
        clmul_cpu = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    }
    if (!clmul_cpu) return 0;
    if (n >= 64) {
        size_t blocks = n & ~(size_t)15;
        crc = ~crc32_clmul(p, blocks, ~crc);
        p += blocks;
        n -= blocks;
    }
    *out = crc32_bytes(crc, p, n);
    return 1;
#else
    (void)crc; (void)p; (void)n; (void)out;
    return 0;
#endif
}

/* crc32(data, value) -> zlib.crc32(data, value), or None where the CPU cannot fold it */
static PyObject *crc32_py(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t start;
    if (n != 2 || u64_of(args[1], &start) || start >> 32) {
        PyErr_SetString(PyExc_TypeError, "crc32(data: bytes-like, value: a 32-bit unsigned int)");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t out;
    int folded = crc32_folded((uint32_t)start, b.buf, (size_t)b.len, &out);
    PyBuffer_Release(&b);
    if (!folded) Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(out);
}

static PyMethodDef crc_methods[] = {
    {"crc32", (PyCFunction)(void (*)(void))crc32_py, METH_FASTCALL,
     "crc32(data, value) -> zlib.crc32(data, value), or None without PCLMULQDQ (object_crc)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_crc_methods(PyObject *module) {
    return PyModule_AddFunctions(module, crc_methods);
}

/* -- fusee.driver.run in one C loop ---------------------------------------------------------
 *
 * Every operation is driven by fusee.driver.run: ``op.send(completions)`` and
 * ``executor.execute(batch)`` once per round trip, StopIteration raised, caught and its
 * traceback built at the end. Compiled by mypyc, those method calls by name (and the
 * exception) were a sixth of an UPDATE's instructions (issue 12). This is the same loop:
 * PyIter_Send (the generator's am_send slot: its value returned, no StopIteration), the
 * executor's ``execute`` looked up and called per batch as Python does. The rest is as the
 * Python function reads, which stays the spec (fusee.driver.run_in_python, run where this
 * extension is not built; tests/test_driver_in_c.py holds the two equal on every path):
 *   - a step that is not verbs (its first request's type in ``not_verbs``) goes to
 *     ``not_a_verb(request, executor)``, the Python function, instead of ``execute``;
 *   - a TransportError from either (or from looking at the step) is thrown into ``op``, the
 *     exception being handled meanwhile as Python's ``except`` clause has it;
 *   - a StopIteration from anywhere in the loop ends it with its value (Python's outer
 *     ``except StopIteration``);
 *   - any other exception closes ``op`` (being handled meanwhile) and propagates, chained
 *     under whatever ``close`` raised, if it did. */

static PyObject *str_execute, *str_throw, *str_close, *str_send;

/* 1 when ``batch`` is a non-empty step whose first request's type is in ``not_verbs``
 * (Python: ``batch and type(batch[0]) in not_verbs``), 0 when not, -1 with an error set;
 * the first request (a new reference) in ``*first`` when 1 */
static int not_verbs_step(PyObject *batch, PyObject *not_verbs, PyObject **first) {
    PyObject *item;
    if (PyList_CheckExact(batch)) {
        if (PyList_GET_SIZE(batch) == 0) return 0;
        item = Py_NewRef(PyList_GET_ITEM(batch, 0));
    } else {
        int truth = PyObject_IsTrue(batch);
        if (truth <= 0) return truth;
        PyObject *zero = PyLong_FromLong(0);
        item = zero ? PyObject_GetItem(batch, zero) : NULL;
        Py_XDECREF(zero);
        if (!item) return -1;
    }
    PyObject *t = (PyObject *)Py_TYPE(item);
    int found = 0;
    if (Py_IS_TYPE(t, &PyType_Type) && PyTuple_CheckExact(not_verbs)) {
        /* ``type`` compares by identity: ``in`` without a call */
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(not_verbs) && !found; i++)
            found = PyTuple_GET_ITEM(not_verbs, i) == t;
    } else {
        found = PySequence_Contains(not_verbs, t);
    }
    if (found == 1) *first = item;
    else Py_DECREF(item);
    return found;
}

/* 0 and the value of the StopIteration raised (None when none is), cleared; -1 when another
 * exception is raised (left as it is) */
static int stop_value(PyObject **out) {
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        if (PyErr_Occurred()) return -1;
        *out = Py_NewRef(Py_None);
        return 0;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    *out = Py_NewRef(value && PyObject_TypeCheck(value, (PyTypeObject *)PyExc_StopIteration)
                     ? ((PyStopIterationObject *)value)->value : Py_None);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
    return 0;
}

/* ``op.throw(error)`` with ``error`` being handled meanwhile (Python's ``except ... as e:
 * op.throw(e)``) -> PyIter_Send's result and ``*out`` */
static PySendResult throw_into(PyObject *op, PyObject *error, PyObject **out) {
    PyObject *handled = PyErr_GetHandledException();
    PyErr_SetHandledException(error);
    *out = PyObject_CallMethodOneArg(op, str_throw, error);
    PyErr_SetHandledException(handled);
    Py_XDECREF(handled);
    if (*out) return PYGEN_NEXT;
    return stop_value(out) == 0 ? PYGEN_RETURN : PYGEN_ERROR;
}

/* ``op.send(arg)`` -> PyIter_Send's result and ``*out``: through the am_send slot where
 * ``op`` has one (a generator, compiled or not), else the ``send`` method by name as the
 * spec calls it (PyIter_Send would call ``__next__`` for a None, where the spec fails on
 * an iterator that has no ``send``) */
static PySendResult send_into(PyObject *op, PyObject *arg, PyObject **out) {
    PyAsyncMethods *am = Py_TYPE(op)->tp_as_async;
    if (am && am->am_send) return PyIter_Send(op, arg, out);
    *out = PyObject_CallMethodOneArg(op, str_send, arg);
    if (*out) return PYGEN_NEXT;
    return stop_value(out) == 0 ? PYGEN_RETURN : PYGEN_ERROR;
}

/* the raised exception, normalized, with its traceback attached (a new reference) */
static PyObject *fetch_error(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static PyObject *drive_run(PyObject *state, PyObject *const *args, Py_ssize_t n) {
    if (n != 2 || !PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 3) {
        PyErr_SetString(PyExc_TypeError, "run(op, executor)");
        return NULL;
    }
    PyObject *op = args[0], *executor = args[1];
    PyObject *not_verbs = PyTuple_GET_ITEM(state, 0), *not_a_verb = PyTuple_GET_ITEM(state, 1),
             *transport_error = PyTuple_GET_ITEM(state, 2);
    PyObject *step;
    PySendResult sent = send_into(op, Py_None, &step);
    while (sent == PYGEN_NEXT) {
        PyObject *first = NULL, *done;
        int kind = not_verbs_step(step, not_verbs, &first);
        if (kind == 1) {
            PyObject *call[2] = {first, executor};
            done = PyObject_Vectorcall(not_a_verb, call, 2, NULL);
            Py_DECREF(first);
        } else if (kind == 0) {
            PyObject *call[2] = {executor, step};
            done = PyObject_VectorcallMethod(str_execute, call,
                                             2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        } else {
            done = NULL;
        }
        Py_DECREF(step);
        if (done) {
            sent = send_into(op, done, &step);
            Py_DECREF(done);
        } else if (PyErr_ExceptionMatches(transport_error)) {
            PyObject *error = fetch_error();
            if (!error) return NULL;
            sent = throw_into(op, error, &step);
            Py_DECREF(error);
        } else {
            break;                              /* an error: below */
        }
    }
    if (sent == PYGEN_RETURN) return step;
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {      /* Python's outer except clause */
        PyObject *value;
        return stop_value(&value) == 0 ? value : NULL;
    }
    PyObject *error = fetch_error();            /* op.close() with it handled, re-raised */
    if (!error) return NULL;
    PyObject *handled = PyErr_GetHandledException();
    PyErr_SetHandledException(error);
    PyObject *closed = PyObject_CallMethodNoArgs(op, str_close);
    PyErr_SetHandledException(handled);
    Py_XDECREF(handled);
    if (closed) {                   /* re-raised */
        Py_DECREF(closed);
        PyErr_Restore(Py_NewRef(Py_TYPE(error)), error, PyException_GetTraceback(error));
    } else {                        /* close's own, its context set as it was raised */
        Py_DECREF(error);
    }
    return NULL;
}

static PyMethodDef drive_run_def = {
    "run", (PyCFunction)(void (*)(void))drive_run, METH_FASTCALL,
    "run(op, executor) -> op's result: fusee.driver.run, in C"};

/* driver(not_verbs, not_a_verb, transport_error) -> run(op, executor), fusee.driver.run
 * with those three of fusee.driver's names bound */
static PyObject *driver(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "driver(not_verbs, not_a_verb, transport_error)");
        return NULL;
    }
    return with_state(&drive_run_def, PyTuple_Pack(3, args[0], args[1], args[2]));
}

/* step(op, arg) -> what ``op.send(arg)`` yields next, or the StopIteration it would raise,
 * made and returned instead (its value the operation's result). fusee.driver.step_in_python
 * is the spec (tests/test_driver_in_c.py holds the two equal). ``run_concurrently`` steps
 * every operation in flight through this: compiled by mypyc, catching the StopIteration that
 * ends each operation built a traceback entry and restored the exception state several
 * times, an eighth of a pipelined SEARCH's instructions (issue 12); through the am_send slot
 * a finished generator raises nothing. */
static PyObject *step_op(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "step(op, arg)");
        return NULL;
    }
    PyObject *out;
    PySendResult sent = send_into(args[0], args[1], &out);
    if (sent == PYGEN_NEXT) return out;
    if (sent == PYGEN_ERROR) return NULL;
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, out);
    Py_DECREF(out);
    return stop;
}

static PyMethodDef driver_methods[] = {
    {"driver", (PyCFunction)(void (*)(void))driver, METH_FASTCALL,
     "driver(not_verbs, not_a_verb, transport_error) -> run(op, executor): fusee.driver.run "
     "in C"},
    {"step", (PyCFunction)(void (*)(void))step_op, METH_FASTCALL,
     "step(op, arg) -> what op.send(arg) yields, or the StopIteration it would raise, "
     "returned: fusee.driver.step_in_python in C"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_driver_methods(PyObject *module) {
    if (!(str_execute = PyUnicode_InternFromString("execute")) ||
        !(str_throw = PyUnicode_InternFromString("throw")) ||
        !(str_close = PyUnicode_InternFromString("close")) ||
        !(str_send = PyUnicode_InternFromString("send"))) return -1;
    return PyModule_AddFunctions(module, driver_methods);
}

/* -- the zmq client's completions placed in batch order (transports/zeromq.py) ------------
 *
 * place(size, groups, replies) -> [completion, ...], or None.
 *
 * A batch of verbs spanning the memory nodes went out as one message per node (``group``'s
 * positions, node -> [position, ...]); ``replies`` holds each node's decoded reply
 * (``Channels.exchange``). When every node's reply is a clean ``(completions, None)`` with one
 * completion per request, they are put at their requests' positions in a list of ``size``:
 * the batch's completions. Anything else (a node without a reply, a TransportError, an
 * error, a short reply, a position not in the list) gives None, and the caller's general
 * path words the failure. The Python spec is ``transports.zeromq.place_completions``
 * (tests/test_fast_path.py holds the two equal); done there, the loop over the verbs cost a
 * few microseconds per depth-8 batch, about a tenth of the transport's Python. */
static PyObject *place_completions(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3 || !PyLong_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "place(size: int, groups: dict, replies: dict)");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[0]);
    if (size < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "place: a negative size");
        return NULL;
    }
    PyObject *results = PyList_New(size);
    if (!results) return NULL;
    for (Py_ssize_t i = 0; i < size; i++) PyList_SET_ITEM(results, i, Py_NewRef(Py_None));
    Py_ssize_t at = 0;
    PyObject *node, *idx;
    while (PyDict_Next(args[1], &at, &node, &idx)) {
        PyObject *reply = PyDict_GetItemWithError(args[2], node);
        if (!reply) {
            if (PyErr_Occurred()) goto fail;
            goto general;
        }
        if (!PyList_CheckExact(idx) || !PyTuple_CheckExact(reply) ||
            PyTuple_GET_SIZE(reply) != 2 || PyTuple_GET_ITEM(reply, 1) != Py_None) goto general;
        PyObject *done = PyTuple_GET_ITEM(reply, 0);
        Py_ssize_t count = PyList_GET_SIZE(idx);
        if (!PyList_CheckExact(done) || PyList_GET_SIZE(done) != count) goto general;
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *p = PyList_GET_ITEM(idx, k);
            Py_ssize_t i = PyLong_CheckExact(p) ? PyLong_AsSsize_t(p) : -1;
            if (i < 0 || i >= size) {
                PyErr_Clear();
                goto general;
            }
            PyObject *old = PyList_GET_ITEM(results, i);
            PyList_SET_ITEM(results, i, Py_NewRef(PyList_GET_ITEM(done, k)));
            Py_DECREF(old);
        }
    }
    return results;
general:
    Py_DECREF(results);
    return Py_NewRef(Py_None);
fail:
    Py_DECREF(results);
    return NULL;
}

static PyMethodDef place_methods[] = {
    {"place", (PyCFunction)(void (*)(void))place_completions, METH_FASTCALL,
     "place(size, groups, replies) -> the batch's completions in order, or None (see the C "
     "source)"},
    {NULL, NULL, 0, NULL},
};

/* the block above, added to the module by PyInit__atomic */
static int add_place_methods(PyObject *module) {
    return PyModule_AddFunctions(module, place_methods);
}
