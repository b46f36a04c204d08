/* 8-byte atomics on raw addresses, for memory shared between processes.
 *
 * Python has no atomic compare-and-swap or fetch-and-add on a buffer; a NIC does them in
 * hardware. These three functions are the whole of what the emulated NIC and the shm client
 * need: the lock-prefixed instructions the CPU offers, called with METH_FASTCALL so that the
 * call costs tens of nanoseconds. Bounds, alignment and keys are checked by the caller
 * (emulator.memory) before an address gets here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static PyMethodDef methods[] = {
    {"cas", (PyCFunction)(void (*)(void))atomic_cas, METH_FASTCALL, "cas(address, expected, desired) -> old"},
    {"faa", (PyCFunction)(void (*)(void))atomic_faa, METH_FASTCALL, "faa(address, delta) -> old"},
    {"load", atomic_load, METH_O, "load(address) -> value"},
    {"address", atomic_address, METH_O, "address(writable buffer) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_atomic",
                                    "8-byte hardware atomics on shared memory", -1, methods};

PyMODINIT_FUNC PyInit__atomic(void) { return PyModule_Create(&module); }
