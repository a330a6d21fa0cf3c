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
 * A Method on the model's class makes the call `model.forward(x=x)` reach the Caller
 * without a Python frame (below).
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
    Py_ssize_t release_from; /* batches from here run with the GIL released; a shorter
                              * call keeps it (handing it over costs 0.18 us) */
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
    /* interned copies: a call's keywords, interned by Python's compiler, then match them by
     * identity (method_serve) */
    into->names = PyTuple_New(into->count);
    if (into->names == NULL)
        return -1;
    for (npy_intp k = 0; k < into->count; k++) {
        PyObject *name = Py_NewRef(PyTuple_GET_ITEM(names, k));
        PyUnicode_InternInPlace(&name);
        PyTuple_SET_ITEM(into->names, k, name);
    }
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
                            "direct_below", "release_from", "threads", "get_threads",
                            "set_threads", "lock", "fallback", "keep", NULL};
    PyObject *glue, *lead, *inputs, *in_shapes, *outputs, *out_shapes, *get, *set, *lock,
        *fallback, *keep;
    const char *dtype;
    Py_ssize_t stage_bytes, direct_below, release_from;
    int returns_loss, threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!psOOOOnnniOOO!OO:Caller", names, &glue,
                                     &PyTuple_Type, &lead, &returns_loss, &dtype, &inputs,
                                     &in_shapes, &outputs, &out_shapes, &stage_bytes,
                                     &direct_below, &release_from, &threads, &get, &set,
                                     &LockType, &lock, &fallback, &keep))
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
    self->release_from = release_from;
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

/* The call on input arrays `xs` (in the entry's order): its outputs as a new {output:
 * array} dict and the loss in *loss; NULL without an exception when this object does not
 * serve the call (the caller falls back to Python), NULL with one on an error. */
static PyObject *serve(Caller *self, PyObject *const *xs, double *loss)
{
    PyObject *ys[MAX_ARRAYS];
    npy_intp n = batch_of(self, xs);
    if (n == 0)
        return NULL;
    npy_intp made = 0;
    for (; made < self->out.count; made++) {
        npy_intp *shape = self->out.shape[made];
        shape[0] = n;
        Py_INCREF(self->descr);   /* stolen */
        ys[made] = PyArray_NewFromDescr(&PyArray_Type, self->descr, self->out.rank[made] + 1,
                                        shape, NULL, NULL, 0, NULL);
        if (ys[made] == NULL) {
            for (npy_intp k = 0; k < made; k++)
                Py_DECREF(ys[k]);
            return NULL;
        }
    }
    void *args[MAX_LEAD + 1 + 2 * MAX_ARRAYS];
    int at = 0;
    for (int k = 0; k < self->n_lead; k++)
        args[at++] = self->lead[k];
    at++;   /* work, read under the lock */
    for (npy_intp k = 0; k < self->in.count; k++) {
        Py_INCREF(xs[k]);   /* their owner may drop them while the GIL is released */
        args[at++] = PyArray_DATA((PyArrayObject *)xs[k]);
    }
    for (npy_intp k = 0; k < self->out.count; k++)
        args[at++] = PyArray_DATA((PyArrayObject *)ys[k]);
    take(self->lock);
    int served = n <= self->work_batch;   /* else the fallback grows the arena */
    *loss = 0.0;
    if (served) {
        args[self->n_lead] = self->work_data;
        PyThreadState *saved = n >= self->release_from ? PyEval_SaveThread() : NULL;
        int before = 0;
        if (self->threads) {
            before = self->get_threads();
            self->set_threads(self->threads);
        }
        self->glue(args, (size_t)n, loss);
        if (self->threads)
            self->set_threads(before);
        if (saved != NULL)
            PyEval_RestoreThread(saved);
    }
    give(self->lock);
    for (npy_intp k = 0; k < self->in.count; k++)
        Py_DECREF(xs[k]);
    PyObject *outs = served ? PyDict_New() : NULL;
    int failed = served && outs == NULL;
    for (npy_intp k = 0; k < self->out.count; k++) {
        if (outs != NULL && !failed)
            failed = PyDict_SetItem(outs, PyTuple_GET_ITEM(self->out.names, k), ys[k]) < 0;
        Py_DECREF(ys[k]);
    }
    if (failed)
        Py_CLEAR(outs);
    return outs;
}

/* run(given): the call on the dict of given inputs; (loss or None, {output: array}). */
static PyObject *Caller_run(Caller *self, PyObject *given)
{
    PyObject *xs[MAX_ARRAYS];
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
    double loss;
    PyObject *outs = serve(self, xs, &loss);
    if (outs == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto fallback;
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
    {"release_from", T_PYSSIZET, offsetof(Caller, release_from), READONLY,
     "the batch from which the C runs with the GIL released"},
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

/* Where a model keeps its Callers: {kind: Caller} (graphc/model.py). */
static PyObject *fast_calls_name;

enum { RETURNS_OUTPUTS, RETURNS_LOSS, RETURNS_BOTH };

/* A model's method (forward, predict, evaluate, train_step) on its class. Read as an
 * attribute it is the Python function it wraps (`model.forward` is a bound method with that
 * function's signature and docs), but the call `model.forward(x=x)` comes here with the model
 * as its first argument and no bound method made (Py_TPFLAGS_METHOD_DESCRIPTOR), and the
 * model's Caller for the kind serves it without a Python frame: that frame, its **inputs
 * dict and the lookups of the Caller cost 0.4 us of W2's 1.7 us forward. Every call the
 * Caller does not serve goes to the Python function as it was made. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *function;
    PyObject *kind;   /* the key of its Caller in the model's fast_calls_name dict */
    int returns;
} Method;

/* 1 when the Caller served the call (*result: what the method returns, or NULL with an
 * exception), 0 when the Python function must make it. */
static int method_serve(Method *self, PyObject *model, PyObject *const *values,
                        PyObject *kwnames, PyObject **result)
{
    *result = NULL;
    PyObject *calls = PyObject_GetAttr(model, fast_calls_name);
    if (calls == NULL) {   /* a model not made by CompiledModel.__init__: the function says */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return 1;
        PyErr_Clear();
        return 0;
    }
    PyObject *found = PyDict_CheckExact(calls) ? PyDict_GetItemWithError(calls, self->kind)
                                               : NULL;
    Py_XINCREF(found);   /* the dict may lose it while the GIL is released */
    Py_DECREF(calls);
    if (found == NULL || !Py_IS_TYPE(found, &CallerType)) {
        Py_XDECREF(found);
        return PyErr_Occurred() != NULL;
    }
    Caller *caller = (Caller *)found;
    PyObject *xs[MAX_ARRAYS];
    Py_ssize_t given = PyTuple_GET_SIZE(kwnames);
    int matched = given == caller->in.count;
    /* Python passes distinct keywords, so the same count and every input found is a match */
    for (npy_intp k = 0; matched && k < caller->in.count; k++) {
        PyObject *name = PyTuple_GET_ITEM(caller->in.names, k);
        xs[k] = NULL;
        for (Py_ssize_t j = 0; j < given && xs[k] == NULL; j++) {
            PyObject *keyword = PyTuple_GET_ITEM(kwnames, j);
            if (keyword == name || PyUnicode_Compare(keyword, name) == 0)
                xs[k] = values[j];
        }
        matched = xs[k] != NULL;
    }
    double loss;
    PyObject *outs = matched ? serve(caller, xs, &loss) : NULL;
    Py_DECREF(found);
    if (outs == NULL)
        return PyErr_Occurred() != NULL;
    if (self->returns == RETURNS_OUTPUTS) {
        *result = outs;
        return 1;
    }
    PyObject *value = PyFloat_FromDouble(loss);
    if (value != NULL && self->returns == RETURNS_BOTH) {
        *result = PyTuple_Pack(2, value, outs);
        Py_DECREF(value);
    } else
        *result = value;
    Py_DECREF(outs);
    return 1;
}

static PyObject *Method_vectorcall(Method *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) == 1 && kwnames != NULL) {   /* model.forward(x=x) */
        PyObject *result;
        if (method_serve(self, args[0], args + 1, kwnames, &result))
            return result;
    }
    return PyObject_Vectorcall(self->function, args, nargsf, kwnames);
}

static PyObject *Method_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"function", "kind", "returns", NULL};
    static const char *returns[] = {"outputs", "loss", "both"};
    PyObject *function, *kind;
    const char *what;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUs:Method", names, &function, &kind,
                                     &what))
        return NULL;
    if (!PyCallable_Check(function)) {
        PyErr_SetString(PyExc_TypeError, "Method: function must be callable");
        return NULL;
    }
    int mode = -1;
    for (int k = 0; k < 3; k++)
        if (strcmp(what, returns[k]) == 0)
            mode = k;
    if (mode < 0) {
        PyErr_Format(PyExc_ValueError, "Method: returns is outputs, loss or both, not '%s'",
                     what);
        return NULL;
    }
    Method *self = (Method *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)Method_vectorcall;
    self->function = Py_NewRef(function);
    self->kind = Py_NewRef(kind);
    self->returns = mode;
    return (PyObject *)self;
}

static void Method_dealloc(Method *self)
{
    Py_XDECREF(self->function);
    Py_XDECREF(self->kind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* As the function itself is read: from the class, the function; from a model, bound. */
static PyObject *Method_get(Method *self, PyObject *model, PyObject *Py_UNUSED(type))
{
    if (model == NULL || model == Py_None)
        return Py_NewRef(self->function);
    return PyMethod_New(self->function, model);
}

static PyMemberDef Method_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(Method, function), READONLY, "the Python function"},
    {NULL, 0, 0, 0, NULL}
};

static PyTypeObject MethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_graphc_fastcall.Method",
    .tp_doc = "A model's method whose plain call its Caller serves in C.",
    .tp_basicsize = sizeof(Method),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(Method, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = (descrgetfunc)Method_get,
    .tp_new = Method_new,
    .tp_dealloc = (destructor)Method_dealloc,
    .tp_members = Method_members,
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
    fast_calls_name = PyUnicode_InternFromString("_fast_calls");
    if (fast_calls_name == NULL || PyModule_AddType(m, &LockType) < 0
        || PyModule_AddType(m, &CallerType) < 0 || PyModule_AddType(m, &MethodType) < 0
        || PyModule_AddIntMacro(m, MAX_ARRAYS) < 0 || PyModule_AddIntMacro(m, MAX_RANK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
