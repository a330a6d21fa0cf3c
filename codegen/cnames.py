"""The names the generated C gives its kernels and their arguments.

Kernels are named after what they compute (`h1_forward`, `W1_grad`), their arguments
after the buffers they point to (`W1`, `x`, `dh1` for h1's gradient). Spec names are
checked identifiers (graphc/names.py), but in the C they now meet the standard headers'
names (`exp`, `NAN`, `size_t`), the kernel's own locals (`b`, `acc`, `t0`) and each
other, so every name is taken through a `Namer` that adds `_` until it is free.
"""

from __future__ import annotations

import re

from graphc.ir import LOSS_MEAN, grad_of

MAX_IDENTIFIER = 63  # C99's significant characters for internal identifiers

# C99 to C23 and C++ keywords a C header meets.
C_KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while _Bool _Complex _Imaginary _Alignas _Alignof _Atomic
_Generic _Noreturn _Static_assert _Thread_local alignas alignof bool constexpr false
nullptr static_assert thread_local true typeof typeof_unqual
""".split())

_MATH = """acos asin atan atan2 cos sin tan acosh asinh atanh cosh sinh tanh exp exp2 expm1
frexp ilogb ldexp log log10 log1p log2 logb modf scalbn scalbln cbrt fabs hypot pow sqrt erf
erfc lgamma tgamma ceil floor nearbyint rint lrint llrint round lround llround trunc fmod
remainder remquo copysign nan nextafter nexttoward fdim fmax fmin fma""".split()
# Names <math.h>, <stddef.h> and <stdint.h> (and common libcs' extensions) may declare or
# define as macros: an argument named `NAN` or `exp` would not compile, or would shadow.
RESERVED = C_KEYWORDS | frozenset(
    [f + s for f in _MATH for s in ("", "f", "l")]
    + """j0 j1 jn y0 y1 yn gamma drem finite significand isnan isinf isfinite isnormal
    signbit fpclassify isgreater isgreaterequal isless islessequal islessgreater isunordered
    NAN INFINITY HUGE_VAL HUGE_VALF HUGE_VALL FP_NAN FP_INFINITE FP_ZERO FP_SUBNORMAL
    FP_NORMAL FP_FAST_FMA FP_FAST_FMAF FP_FAST_FMAL FP_ILOGB0 FP_ILOGBNAN MATH_ERRNO
    MATH_ERREXCEPT math_errhandling float_t double_t errno NULL offsetof size_t ptrdiff_t
    wchar_t max_align_t main""".split())
# Prefixes of macro families in those headers (INT8_MAX, UINT64_C, M_PI, FLT_EVAL_METHOD).
_RESERVED_PREFIX = re.compile(r"(U?INT|SIZE_|PTRDIFF_|WCHAR_|WINT_|SIG_ATOMIC_|M_|FLT_|DBL_|"
                              r"LDBL_|FP_|HUGE_|MATH_)|.*_t$")


class Namer:
    """Hands out distinct identifiers: a wanted name, or it with `_` added until free."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def free(self, name: str) -> bool:
        return name not in self.taken and name not in RESERVED \
            and not _RESERVED_PREFIX.match(name) and len(name) <= MAX_IDENTIFIER

    def take(self, wanted: str, fallback: str = "kernel", numbered: bool = False) -> str:
        """`wanted` if free; else, `numbered`, `wanted_2`, `wanted_3`...; or `wanted_`.
        Past C99's 63 significant characters, `fallback` and a number."""
        if _RESERVED_PREFIX.match(wanted) and not wanted.endswith("_t"):
            wanted = "v_" + wanted   # no suffix frees INT8_ or M_ from their prefix
        name = wanted if len(wanted) <= MAX_IDENTIFIER else f"{fallback}{len(self.taken)}"
        count = 1
        while not self.free(name):
            count += 1
            name = f"{wanted}_{count}" if numbered else name + "_"
            if len(name) > MAX_IDENTIFIER:
                name = f"{fallback}{len(self.taken) + count}"
        self.taken.add(name)
        return name


def buffer_word(buffer: str) -> str:
    """A buffer's name as C spells it: `W1.grad` is `dW1`, `loss.sumexp` `loss_sumexp`,
    graphc's own `__batch_loss` `batch_loss`."""
    value = grad_of(buffer)
    word = (value or buffer).strip("_").replace(".", "_")
    return word if value is None else f"d{word}"


def kernel_word(out: str) -> str:
    """What a kernel computes, as a function name: `h1_forward`, `W1_grad` (a kernel writing
    a value's gradient), `batch_mean_loss`."""
    value = grad_of(out)
    word = "batch_mean_loss" if out == LOSS_MEAN else f"{value}_grad" if value is not None \
        else f"{out}_forward"
    return re.sub(r"\W+", "_", word).strip("_")
