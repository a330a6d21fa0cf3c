/* graphc's call of a one-input, one-output entry point (forward, predict) from Python.
 *
 * A cffi call from Python converts each array with ffi.from_buffer and makes the output with
 * np.empty: 2.5 us on a 2 GHz core, where the W2 forward's C takes 0.23 us. This object does
 * the common case (the entry's input alone, a C-contiguous aligned array of the model's
 * dtype and per-example shape, small enough to need no staging, a batch the work arena
 * serves) with numpy's C API, under the model's lock, and hands every other call to the
 * Python path it replaces (`fallback`), which converts, stages, grows the arena or says why
 * not. It returns what that path returns: (None, {output: array}).
 *
 * Built once per cache, compiler, Python ABI and numpy version (codegen/fastcall.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdint.h>

/* The entry points' C types (codegen's headers): forward takes the params first, predict
 * (baked params) does not. */
typedef void (*forward_f32)(const float *, float *, size_t, const float *, float *);
typedef void (*forward_f64)(const double *, double *, size_t, const double *, double *);
typedef void (*predict_f32)(float *, size_t, const float *, float *);
typedef void (*predict_f64)(double *, size_t, const double *, double *);
typedef int (*get_threads_fn)(void);
typedef void (*set_threads_fn)(int);

/* The model's lock, which every C call of the model holds (the calls share its work arena,
 * and a train step its params): threading.Lock's semantics for `with lock:`, acquire() and
 * release(), and taken here without a Python call (threading.Lock's acquire parses its
 * arguments and reads the clock: a fifth of a small forward's overhead). */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int locked;
} Lock;

static PyObject *Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    Lock *self = (Lock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void Lock_dealloc(Lock *self)
{
    if (self->lock != NULL)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void take(Lock *self)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    self->locked = 1;
}

static void give(Lock *self)
{
    self->locked = 0;
    PyThread_release_lock(self->lock);
}

static PyObject *Lock_acquire(Lock *self, PyObject *Py_UNUSED(ignored))
{
    take(self);
    Py_RETURN_TRUE;
}

static PyObject *Lock_release(Lock *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->locked) {   /* the platform's lock may be a semaphore: never let it count up */
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    give(self);
    Py_RETURN_NONE;
}

static PyObject *Lock_exit(Lock *self, PyObject *Py_UNUSED(args))
{
    return Lock_release(self, NULL);
}

static PyObject *Lock_locked(Lock *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->locked);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)Lock_acquire, METH_NOARGS, "Wait for the lock and take it."},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "Give the lock back."},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "Whether some thread holds it."},
    {"__enter__", (PyCFunction)Lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_graphc_fastcall.Lock",
    .tp_doc = "A model's lock: threading.Lock's acquire(), release() and `with`.",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
};

typedef struct {
    PyObject_HEAD
    void (*fn)(void);        /* the entry point, cast back to its type at the call */
    void *params;            /* NULL for predict */
    int type_num;            /* NPY_FLOAT32 or NPY_FLOAT64 */
    PyObject *input;         /* the input's name (str) */
    PyObject *output;        /* the output's name (str) */
    int in_rank, out_rank;   /* per example */
    npy_intp in_shape[NPY_MAXDIMS], out_shape[NPY_MAXDIMS + 1];   /* out_shape[0]: n */
    Py_ssize_t stage_bytes;  /* inputs this large go to the fallback (it may stage them) */
    Py_ssize_t direct_below; /* batches from here run on the fallback's thread timing */
    int threads;             /* OpenMP threads per call, 0: leave the count as it is */
    get_threads_fn get_threads;
    set_threads_fn set_threads;
    Lock *lock;              /* the model's */
    PyObject *fallback;      /* the Python call this one stands in for */
    PyArray_Descr *descr;    /* the model's dtype */
    PyObject *keep;          /* what owns `params` and the entry point (kept alive) */
    PyObject *work;          /* the work arena (a numpy array) and what it serves */
    void *work_data;
    Py_ssize_t work_batch;
} Caller;

static void Caller_dealloc(Caller *self)
{
    Py_XDECREF(self->input);
    Py_XDECREF(self->output);
    Py_XDECREF(self->lock);
    Py_XDECREF(self->fallback);
    Py_XDECREF((PyObject *)self->descr);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->work);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int read_shape(PyObject *shape, npy_intp *into, int *rank, const char *what)
{
    PyObject *seq = PySequence_Fast(shape, what);
    if (seq == NULL)
        return -1;
    Py_ssize_t k, size = PySequence_Fast_GET_SIZE(seq);
    if (size >= NPY_MAXDIMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s: rank %zd is above numpy's", what, size);
        return -1;
    }
    for (k = 0; k < size; k++) {
        into[k] = (npy_intp)PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (into[k] < 0) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s: a negative extent", what);
            return -1;
        }
    }
    *rank = (int)size;
    Py_DECREF(seq);
    return 0;
}

static void *address(PyObject *value, const char *what)
{
    if (value == Py_None)
        return NULL;
    void *p = PyLong_AsVoidPtr(value);
    if (p == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s: a null address", what);
    return p;
}

static PyObject *Caller_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fn", "params", "dtype", "input", "input_shape", "output",
                            "output_shape", "stage_bytes", "direct_below", "threads",
                            "get_threads", "set_threads", "lock", "fallback", "keep", NULL};
    PyObject *fn, *params, *input, *in_shape, *output, *out_shape, *get, *set, *lock,
        *fallback, *keep;
    const char *dtype;
    Py_ssize_t stage_bytes, direct_below;
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOsUOUOnniOOO!OO:Caller", names, &fn,
                                     &params, &dtype, &input, &in_shape, &output, &out_shape,
                                     &stage_bytes, &direct_below, &threads, &get, &set,
                                     &LockType, &lock, &fallback, &keep))
        return NULL;
    Caller *self = (Caller *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->work_data = NULL;
    self->work_batch = 0;
    if (strcmp(dtype, "float32") == 0)
        self->type_num = NPY_FLOAT32;
    else if (strcmp(dtype, "float64") == 0)
        self->type_num = NPY_FLOAT64;
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be float32 or float64, got '%s'", dtype);
        goto fail;
    }
    self->descr = PyArray_DescrFromType(self->type_num);
    if (self->descr == NULL)
        goto fail;
    self->fn = (void (*)(void))(uintptr_t)address(fn, "fn");
    if (self->fn == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "fn: an entry point is needed");
        goto fail;
    }
    self->params = address(params, "params");
    if (PyErr_Occurred())
        goto fail;
    self->get_threads = (get_threads_fn)(uintptr_t)address(get, "get_threads");
    self->set_threads = (set_threads_fn)(uintptr_t)address(set, "set_threads");
    if (PyErr_Occurred())
        goto fail;
    if (threads < 0 || (threads > 0 && (self->get_threads == NULL || self->set_threads == NULL))) {
        PyErr_SetString(PyExc_ValueError, "threads: a count needs OpenMP's get and set");
        goto fail;
    }
    self->threads = threads;
    if (read_shape(in_shape, self->in_shape, &self->in_rank, "input_shape") < 0
        || read_shape(out_shape, self->out_shape + 1, &self->out_rank, "output_shape") < 0)
        goto fail;
    self->stage_bytes = stage_bytes;
    self->direct_below = direct_below;
    Py_INCREF(lock);
    self->lock = (Lock *)lock;
    Py_INCREF(input);
    self->input = input;
    Py_INCREF(output);
    self->output = output;
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(keep);
    self->keep = keep;
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

/* set_work(arena, batch): the work arena (an aligned numpy array of the model's dtype) now
 * serves batches up to `batch`. Called by the model, under its lock, when the arena grows. */
static PyObject *Caller_set_work(Caller *self, PyObject *args)
{
    PyObject *work;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "O!n:set_work", &PyArray_Type, &work, &batch))
        return NULL;
    PyArrayObject *arena = (PyArrayObject *)work;
    if (PyArray_TYPE(arena) != self->type_num || !PyArray_IS_C_CONTIGUOUS(arena)
        || !PyArray_ISWRITEABLE(arena)) {
        PyErr_SetString(PyExc_ValueError, "set_work: a writeable C-contiguous arena of the "
                                          "model's dtype");
        return NULL;
    }
    Py_INCREF(work);
    Py_XSETREF(self->work, work);
    self->work_data = PyArray_DATA(arena);
    self->work_batch = batch;
    Py_RETURN_NONE;
}

static void run_c(const Caller *self, void *work, size_t n, const void *in, void *out)
{
    int before = 0;
    if (self->threads) {
        before = self->get_threads();
        self->set_threads(self->threads);
    }
    if (self->type_num == NPY_FLOAT32) {
        if (self->params)
            ((forward_f32)self->fn)((const float *)self->params, (float *)work, n,
                                    (const float *)in, (float *)out);
        else
            ((predict_f32)self->fn)((float *)work, n, (const float *)in, (float *)out);
    } else {
        if (self->params)
            ((forward_f64)self->fn)((const double *)self->params, (double *)work, n,
                                    (const double *)in, (double *)out);
        else
            ((predict_f64)self->fn)((double *)work, n, (const double *)in, (double *)out);
    }
    if (self->threads)
        self->set_threads(before);
}

/* The call on input array `a`, when this object serves it: 1 and *outs = {output: array};
 * 0 when the Python path must (nothing done); -1 on an error. */
static int serve(Caller *self, PyObject *a, PyObject **outs)
{
    if (!PyArray_CheckExact(a))
        return 0;
    PyArrayObject *x = (PyArrayObject *)a;
    if (PyArray_TYPE(x) != self->type_num || PyArray_ISBYTESWAPPED(x)
        || !PyArray_IS_C_CONTIGUOUS(x) || !PyArray_ISALIGNED(x)
        || PyArray_NDIM(x) != self->in_rank + 1)
        return 0;
    const npy_intp *dims = PyArray_DIMS(x);
    for (int k = 0; k < self->in_rank; k++)
        if (dims[k + 1] != self->in_shape[k])
            return 0;
    npy_intp n = dims[0];
    if (n < 1 || n >= self->direct_below || PyArray_NBYTES(x) >= self->stage_bytes)
        return 0;
    npy_intp out_shape[NPY_MAXDIMS + 1];
    memcpy(out_shape, self->out_shape, sizeof out_shape);
    out_shape[0] = n;
    Py_INCREF(self->descr);   /* stolen */
    PyObject *out = PyArray_NewFromDescr(&PyArray_Type, self->descr, self->out_rank + 1,
                                         out_shape, NULL, NULL, 0, NULL);
    if (out == NULL)
        return -1;
    Py_INCREF(a);   /* the caller's dict may lose it while the GIL is released */
    take(self->lock);
    if (n > self->work_batch) {   /* the Python path grows the arena (under the lock) */
        give(self->lock);
        Py_DECREF(a);
        Py_DECREF(out);
        return 0;
    }
    void *work = self->work_data, *y = PyArray_DATA((PyArrayObject *)out);
    const void *in = PyArray_DATA(x);
    Py_BEGIN_ALLOW_THREADS
    run_c(self, work, (size_t)n, in, y);
    Py_END_ALLOW_THREADS
    give(self->lock);
    Py_DECREF(a);
    *outs = PyDict_New();
    if (*outs == NULL || PyDict_SetItem(*outs, self->output, out) < 0) {
        Py_XDECREF(*outs);
        Py_DECREF(out);
        return -1;
    }
    Py_DECREF(out);
    return 1;
}

/* run(given): the call on the dict of given inputs; (None, {output: array}). */
static PyObject *Caller_run(Caller *self, PyObject *given)
{
    if (PyDict_CheckExact(given) && PyDict_GET_SIZE(given) == 1) {
        PyObject *a = PyDict_GetItemWithError(given, self->input);   /* borrowed */
        if (a == NULL && PyErr_Occurred())
            return NULL;
        PyObject *outs;
        int served = a == NULL ? 0 : serve(self, a, &outs);
        if (served < 0)
            return NULL;
        if (served) {
            PyObject *result = PyTuple_New(2);
            if (result == NULL) {
                Py_DECREF(outs);
                return NULL;
            }
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(result, 0, Py_None);
            PyTuple_SET_ITEM(result, 1, outs);
            return result;
        }
    }
    return PyObject_CallOneArg(self->fallback, given);
}

static PyMethodDef Caller_methods[] = {
    {"run", (PyCFunction)Caller_run, METH_O,
     "run(given): the entry point on the dict of given inputs; (None, {output: array})."},
    {"set_work", (PyCFunction)Caller_set_work, METH_VARARGS,
     "set_work(arena, batch): the work arena now serves batches up to `batch`."},
    {NULL, NULL, 0, NULL}
};

static PyMemberDef Caller_members[] = {
    {"direct_below", T_PYSSIZET, offsetof(Caller, direct_below), READONLY,
     "the batch from which calls go to the fallback"},
    {"threads", T_INT, offsetof(Caller, threads), READONLY,
     "OpenMP threads per call (0: the caller's count)"},
    {"work_batch", T_PYSSIZET, offsetof(Caller, work_batch), READONLY,
     "the largest batch the work arena serves"},
    {NULL, 0, 0, 0, NULL}
};

static PyTypeObject CallerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_graphc_fastcall.Caller",
    .tp_doc = "A model entry point's call from Python, in C for the common case.",
    .tp_basicsize = sizeof(Caller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Caller_new,
    .tp_dealloc = (destructor)Caller_dealloc,
    .tp_methods = Caller_methods,
    .tp_members = Caller_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_graphc_fastcall",
    "graphc's C call of a model entry point from Python (codegen/fastcall.py).", -1, NULL,
    NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC PyInit__graphc_fastcall(void)
{
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddType(m, &LockType) < 0 || PyModule_AddType(m, &CallerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
