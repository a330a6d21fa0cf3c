/* graphc's call of a model's entry point (forward, predict, evaluate, train_step) from Python.
 *
 * A cffi call from Python converts each array with ffi.from_buffer and makes each output
 * with np.empty: 2.5 us on a 2 GHz core, where the W2 forward's C takes 0.23 us. A Caller
 * does the common case (exactly the entry's inputs, each a C-contiguous aligned array of
 * the model's dtype and per-example shape, small enough to need no staging, one batch size,
 * which the work arena serves) with numpy's C API, under the model's lock, and hands every
 * other call to the Python path it replaces (`fallback`), which converts, stages, grows the
 * arena or says why not. It returns what that path returns: (loss or None, {output: array}).
 *
 * The entry is called through the model's glue (codegen/fastcall.py), one signature for
 * every model and entry: void glue(void *const *args, size_t n, double *loss), args being
 * the leading pointers (params, state), work, the inputs and the outputs.
 *
 * Built once per cache, compiler, Python ABI and numpy version (codegen/fastcall.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdint.h>

#define MAX_ARRAYS 8   /* inputs, and outputs, an entry may have for the C path */
#define MAX_RANK 16    /* per-example rank */
#define MAX_LEAD 2     /* params, state */

typedef void (*glue_fn)(void *const *args, size_t n, double *loss);
typedef int (*get_threads_fn)(void);
typedef void (*set_threads_fn)(int);

/* The model's lock, which every C call of the model holds (the calls share its work arena,
 * and a train step its params): threading.Lock's semantics for `with lock:`, acquire() and
 * release(), and taken here without a Python call (threading.Lock's acquire parses its
 * arguments and reads the clock: about 0.2 us of W2's 1.6 us from Python). */
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
    npy_intp count;          /* arrays */
    PyObject *names;         /* tuple of str */
    int rank[MAX_ARRAYS];    /* per example */
    npy_intp shape[MAX_ARRAYS][MAX_RANK + 1];   /* [k][0]: the batch, filled per call */
} Arrays;

typedef struct {
    PyObject_HEAD
    glue_fn glue;
    void *lead[MAX_LEAD];    /* params, state: never move */
    int n_lead;
    int returns_loss;        /* evaluate, train_step */
    int type_num;            /* NPY_FLOAT32 or NPY_FLOAT64 */
    PyArray_Descr *descr;
    Arrays in, out;
    Py_ssize_t stage_bytes;  /* an input this large goes to the fallback (it may stage it) */
    Py_ssize_t direct_below; /* batches from here run on the fallback's thread timing */
    int threads;             /* OpenMP threads per call, 0: leave the count as it is */
    get_threads_fn get_threads;
    set_threads_fn set_threads;
    Lock *lock;              /* the model's */
    PyObject *fallback;      /* the Python call this one stands in for */
    PyObject *keep;          /* what owns the lead pointers and the glue (kept alive) */
    PyObject *work;          /* the work arena (a numpy array) and what it serves */
    void *work_data;
    Py_ssize_t work_batch;
} Caller;

static void Caller_dealloc(Caller *self)
{
    Py_XDECREF(self->in.names);
    Py_XDECREF(self->out.names);
    Py_XDECREF(self->lock);
    Py_XDECREF(self->fallback);
    Py_XDECREF((PyObject *)self->descr);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->work);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* names (str) and per-example shapes (tuples of ints) into `into`; -1 with an exception. */
static int read_arrays(PyObject *names, PyObject *shapes, Arrays *into, const char *what)
{
    if (!PyTuple_Check(names) || !PyTuple_Check(shapes)
        || PyTuple_GET_SIZE(names) != PyTuple_GET_SIZE(shapes)
        || PyTuple_GET_SIZE(names) > MAX_ARRAYS) {
        PyErr_Format(PyExc_ValueError, "%s: a tuple of at most %d names and one of shapes",
                     what, MAX_ARRAYS);
        return -1;
    }
    into->count = PyTuple_GET_SIZE(names);
    for (npy_intp k = 0; k < into->count; k++) {
        PyObject *shape = PyTuple_GET_ITEM(shapes, k);
        if (!PyUnicode_Check(PyTuple_GET_ITEM(names, k)) || !PyTuple_Check(shape)
            || PyTuple_GET_SIZE(shape) > MAX_RANK) {
            PyErr_Format(PyExc_ValueError, "%s: names are str, shapes tuples of rank <= %d",
                         what, MAX_RANK);
            return -1;
        }
        into->rank[k] = (int)PyTuple_GET_SIZE(shape);
        for (int d = 0; d < into->rank[k]; d++) {
            Py_ssize_t extent = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, d));
            if (extent < 0) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "%s: a negative extent", what);
                return -1;
            }
            into->shape[k][d + 1] = (npy_intp)extent;
        }
    }
    Py_INCREF(names);
    into->names = names;
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
    static char *names[] = {"glue", "lead", "returns_loss", "dtype", "inputs",
                            "input_shapes", "outputs", "output_shapes", "stage_bytes",
                            "direct_below", "threads", "get_threads", "set_threads", "lock",
                            "fallback", "keep", NULL};
    PyObject *glue, *lead, *inputs, *in_shapes, *outputs, *out_shapes, *get, *set, *lock,
        *fallback, *keep;
    const char *dtype;
    Py_ssize_t stage_bytes, direct_below;
    int returns_loss, threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!psOOOOnniOOO!OO:Caller", names, &glue,
                                     &PyTuple_Type, &lead, &returns_loss, &dtype, &inputs,
                                     &in_shapes, &outputs, &out_shapes, &stage_bytes,
                                     &direct_below, &threads, &get, &set, &LockType, &lock,
                                     &fallback, &keep))
        return NULL;
    Caller *self = (Caller *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
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
    self->glue = (glue_fn)(uintptr_t)address(glue, "glue");
    if (self->glue == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "glue: an entry point is needed");
        goto fail;
    }
    if (PyTuple_GET_SIZE(lead) > MAX_LEAD) {
        PyErr_Format(PyExc_ValueError, "lead: at most %d pointers", MAX_LEAD);
        goto fail;
    }
    self->n_lead = (int)PyTuple_GET_SIZE(lead);
    for (int k = 0; k < self->n_lead; k++) {
        self->lead[k] = address(PyTuple_GET_ITEM(lead, k), "lead");
        if (self->lead[k] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "lead: an address is needed");
            goto fail;
        }
    }
    self->returns_loss = returns_loss;
    self->get_threads = (get_threads_fn)(uintptr_t)address(get, "get_threads");
    self->set_threads = (set_threads_fn)(uintptr_t)address(set, "set_threads");
    if (PyErr_Occurred())
        goto fail;
    if (threads < 0 || (threads > 0 && (self->get_threads == NULL || self->set_threads == NULL))) {
        PyErr_SetString(PyExc_ValueError, "threads: a count needs OpenMP's get and set");
        goto fail;
    }
    self->threads = threads;
    if (read_arrays(inputs, in_shapes, &self->in, "inputs") < 0
        || read_arrays(outputs, out_shapes, &self->out, "outputs") < 0)
        goto fail;
    if (self->in.count < 1) {
        PyErr_SetString(PyExc_ValueError, "inputs: at least one (it gives the batch size)");
        goto fail;
    }
    self->stage_bytes = stage_bytes;
    self->direct_below = direct_below;
    Py_INCREF(lock);
    self->lock = (Lock *)lock;
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

/* The batch size of input arrays `xs` when this object can call C on them as they are,
 * else 0. */
static npy_intp batch_of(const Caller *self, PyObject *const *xs)
{
    npy_intp n = 0;
    for (npy_intp k = 0; k < self->in.count; k++) {
        if (!PyArray_CheckExact(xs[k]))
            return 0;
        PyArrayObject *x = (PyArrayObject *)xs[k];
        if (PyArray_TYPE(x) != self->type_num || PyArray_ISBYTESWAPPED(x)
            || !PyArray_IS_C_CONTIGUOUS(x) || !PyArray_ISALIGNED(x)
            || PyArray_NDIM(x) != self->in.rank[k] + 1
            || PyArray_NBYTES(x) >= self->stage_bytes)
            return 0;
        const npy_intp *dims = PyArray_DIMS(x);
        for (int d = 1; d <= self->in.rank[k]; d++)
            if (dims[d] != self->in.shape[k][d])
                return 0;
        if (k > 0 && dims[0] != n)
            return 0;
        n = dims[0];
    }
    return n >= 1 && n < self->direct_below ? n : 0;
}

/* run(given): the call on the dict of given inputs; (loss or None, {output: array}). */
static PyObject *Caller_run(Caller *self, PyObject *given)
{
    PyObject *xs[MAX_ARRAYS], *ys[MAX_ARRAYS];
    if (!PyDict_CheckExact(given) || PyDict_GET_SIZE(given) != self->in.count)
        goto fallback;
    for (npy_intp k = 0; k < self->in.count; k++) {
        xs[k] = PyDict_GetItemWithError(given, PyTuple_GET_ITEM(self->in.names, k));
        if (xs[k] == NULL) {
            if (PyErr_Occurred())
                return NULL;
            goto fallback;
        }
    }
    npy_intp n = batch_of(self, xs);
    if (n == 0)
        goto fallback;
    npy_intp made = 0;
    for (; made < self->out.count; made++) {
        npy_intp *shape = self->out.shape[made];
        shape[0] = n;
        Py_INCREF(self->descr);   /* stolen */
        ys[made] = PyArray_NewFromDescr(&PyArray_Type, self->descr, self->out.rank[made] + 1,
                                        shape, NULL, NULL, 0, NULL);
        if (ys[made] == NULL)
            goto error;
    }
    void *args[MAX_LEAD + 1 + 2 * MAX_ARRAYS];
    int at = 0;
    for (int k = 0; k < self->n_lead; k++)
        args[at++] = self->lead[k];
    at++;   /* work, read under the lock */
    for (npy_intp k = 0; k < self->in.count; k++) {
        Py_INCREF(xs[k]);   /* `given` may lose them while the GIL is released */
        args[at++] = PyArray_DATA((PyArrayObject *)xs[k]);
    }
    for (npy_intp k = 0; k < self->out.count; k++)
        args[at++] = PyArray_DATA((PyArrayObject *)ys[k]);
    take(self->lock);
    int served = n <= self->work_batch;   /* else the fallback grows the arena */
    double loss = 0.0;
    if (served) {
        args[self->n_lead] = self->work_data;
        int before = 0;
        Py_BEGIN_ALLOW_THREADS
        if (self->threads) {
            before = self->get_threads();
            self->set_threads(self->threads);
        }
        self->glue(args, (size_t)n, &loss);
        if (self->threads)
            self->set_threads(before);
        Py_END_ALLOW_THREADS
    }
    give(self->lock);
    for (npy_intp k = 0; k < self->in.count; k++)
        Py_DECREF(xs[k]);
    if (!served) {
        for (npy_intp k = 0; k < self->out.count; k++)
            Py_DECREF(ys[k]);
        goto fallback;
    }
    PyObject *outs = PyDict_New();
    if (outs == NULL)
        goto error;
    for (npy_intp k = 0; k < self->out.count; k++) {
        int failed = PyDict_SetItem(outs, PyTuple_GET_ITEM(self->out.names, k), ys[k]);
        Py_DECREF(ys[k]);
        ys[k] = NULL;
        if (failed < 0) {
            for (npy_intp j = k + 1; j < self->out.count; j++)
                Py_DECREF(ys[j]);
            Py_DECREF(outs);
            return NULL;
        }
    }
    PyObject *first = self->returns_loss ? PyFloat_FromDouble(loss) : Py_NewRef(Py_None);
    if (first == NULL) {
        Py_DECREF(outs);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, first, outs);
    Py_DECREF(first);
    Py_DECREF(outs);
    return result;
error:
    for (npy_intp k = 0; k < made; k++)
        Py_DECREF(ys[k]);
    return NULL;
fallback:
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
    if (PyModule_AddType(m, &LockType) < 0 || PyModule_AddType(m, &CallerType) < 0
        || PyModule_AddIntMacro(m, MAX_ARRAYS) < 0 || PyModule_AddIntMacro(m, MAX_RANK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
