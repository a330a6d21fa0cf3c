"""Hostile and careless input: each case was once a traceback, a hang, a crash or a wrong
answer, and is now one clear error (the CLI: `graphc: error: ...`, exit 2, nothing written)
or the right result."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import graphc
from codegen import build as build_mod
from graphc.cli import main
from graphc.errors import GraphcError, InputError, SpecError
from graphc.graph import MAX_ELEMENTS, MAX_PARAM_ELEMENTS, Graph

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples/mlp.yaml"
REGRESSION = ROOT / "examples/regression.yaml"
CC = os.environ.get("CC", "cc")
HAVE_CC = shutil.which(CC.split()[0]) is not None

# One dense layer under softmax cross-entropy: small enough to build in a second.
NET = {
    "name": "hostile",
    "inputs": {"x": [5], "y": [3]},
    "params": {"W": {"shape": [3, 5], "init": "he_normal"},
               "b": {"shape": [3], "init": "normal", "std": 0.1}},
    "nodes": {"logits": {"op": "dense", "inputs": ["x", "W", "b"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"],
    "loss": "loss",
    "optimizer": {"name": "sgd", "lr": 0.1},
}


def data(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 5)), "y": np.eye(3)[rng.integers(0, 3, n)]}


@pytest.fixture(scope="module")
def net():
    return graphc.compile(NET, dtype="float64")


def error_line(capsys) -> str:
    """The one line the CLI printed on stderr (asserting it is one line, no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("graphc: error: ") and err.count("\n") == 1, err
    return err


def spec_file(tmp_path: Path, spec: dict, name: str = "spec.json") -> Path:
    import json
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


# ---------------------------------------------------------------- 1. negative seeds

@pytest.mark.parametrize("argv", [
    ["check", str(REGRESSION)],
    ["train", str(REGRESSION), "--data", "digits"],
    ["explain", str(REGRESSION)],
])
def test_negative_seed_exits_2(argv, capsys):
    assert main([*argv, "--seed", "-1"]) == 2
    assert "--seed must be a non-negative integer, got -1" in error_line(capsys)


def test_negative_seed_is_an_input_error(net):
    with pytest.raises(InputError, match="seed must be a non-negative integer, got -1"):
        graphc.compile(NET, dtype="float64", seed=-1)
    with pytest.raises(InputError, match="seed must be a non-negative integer, got -3"):
        graphc.fit(net, data(), epochs=1, seed=-3, progress=False)
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        net.init_params(-1)


# ---------------------------------------------------------------- 2. numbers beyond float

HUGE = 10 ** 400


@pytest.mark.parametrize("optimizer, field", [
    ({"name": "sgd", "lr": HUGE}, "lr"),
    ({"name": "momentum", "momentum": HUGE}, "momentum"),
    ({"name": "sgd", "weight_decay": HUGE}, "weight_decay"),
    ({"name": "adam", "betas": [HUGE, 0.9]}, "betas"),
    ({"name": "adam", "eps": HUGE}, "eps"),
])
def test_huge_integer_hyperparameter_is_a_spec_error(optimizer, field):
    with pytest.raises(SpecError) as info:
        Graph.from_spec({**NET, "optimizer": optimizer})
    assert (info.value.node, info.value.field) == ("optimizer", field)
    assert "must be a finite number, got an integer too large for a float" in str(info.value)


@pytest.mark.parametrize("init", [{"init": "normal", "std": HUGE},
                                  {"init": "uniform", "low": -HUGE},
                                  {"init": "uniform", "high": HUGE}])
def test_huge_integer_in_an_initializer_is_a_spec_error(init):
    spec = {**NET, "params": {**NET["params"], "W": {"shape": [3, 5], **init}}}
    with pytest.raises(SpecError) as info:
        Graph.from_spec(spec)
    field = next(k for k in init if k != "init")
    assert (info.value.node, info.value.field) == ("W", field)
    assert "integer too large for a float" in str(info.value)


def test_huge_integer_in_a_yaml_spec_file(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(MLP.read_text().replace("lr: 0.001", "lr: " + "9" * 400))
    assert main(["check", str(path)]) == 2
    assert f"{path}: node 'optimizer': field 'lr': must be a finite number" in error_line(capsys)


def test_integer_beyond_python_s_digit_limit_is_a_spec_error(tmp_path, capsys):
    path = tmp_path / "digits.yaml"
    path.write_text(MLP.read_text().replace("lr: 0.001", "lr: " + "9" * 5000))
    assert main(["check", str(path)]) == 2
    assert f"{path}: invalid YAML: Exceeds the limit" in error_line(capsys)


# ---------------------------------------------------------------- 3. Adam with a zero beta

def _torch_adam(params, batches, opt):
    torch = pytest.importorskip("torch")
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    optim = torch.optim.Adam(tp.values(), lr=opt["lr"], betas=tuple(opt["betas"]),
                             eps=opt["eps"], foreach=False)
    out = []
    for batch in batches:
        x, y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
        loss = torch.nn.functional.cross_entropy(x @ tp["W"].T + tp["b"], y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        out.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    return out


@pytest.mark.parametrize("betas", [[0.0, 0.999], [0.9, 0.0]])
def test_adam_with_a_zero_beta_trains_like_the_reference_and_torch(betas):
    opt = {"name": "adam", "lr": 0.05, "betas": betas}
    model = graphc.compile(NET, dtype="float64", optimizer=opt, seed=3)
    assert model.c_source.count("NAN") == 1   # a refused step's return, no folded log(0)
    ref = graphc.reference(model.graph)
    start = model.get_params()
    ref.set_params(start)
    batches = [data(8, seed=k) for k in range(6)]
    for k, batch in enumerate(batches):
        model.train_step(**batch)
        ref.train_step(**batch)
        for p, want in ref.get_params().items():
            got = model.get_params()[p]
            assert np.all(np.isfinite(got)), f"step {k + 1}: {p} is not finite"
            assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want)), (k, p)
    torch_steps = _torch_adam(start, batches, model.optimizer)
    for p, want in torch_steps[-1].items():
        assert np.max(np.abs(model.get_params()[p] - want)) <= 1e-10 * np.max(np.abs(want)), p


# ---------------------------------------------------------------- 4. the prepared cache

ORDER_A = {"name": "order", "inputs": {"x": [4], "y": [2]}, "params": {"W": [2, 4], "b": [2]},
           "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                     "loss": {"op": "mse", "inputs": ["h", "y"]}},
           "outputs": ["h"], "loss": "loss"}
ORDER_B = {**ORDER_A, "inputs": {"y": [2], "x": [4]}, "params": {"b": [2], "W": [2, 4]}}


def test_prepared_cache_keeps_declaration_order():
    a = graphc.compile(ORDER_A, dtype="float64")
    b = graphc.compile(ORDER_B, dtype="float64")   # same graph, declared in another order
    assert a.cmodule.param_offsets == {"W": 0, "b": 8}
    assert b.cmodule.param_offsets == {"b": 0, "W": 2}
    assert "#define ORDER_PARAM_b_OFFSET 0" in b.c_header
    assert "const double *in_y, const double *in_x)" in b.c_header
    batch = {"x": np.arange(12.0).reshape(3, 4) / 10, "y": np.ones((3, 2))}
    ref = graphc.reference(b.graph)
    ref.set_params(b.get_params())
    want_loss, want = ref.gradients(**batch)
    loss, got = b.gradients(**batch)
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- 5. non-finite data

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_train_refuses_non_finite_data(tmp_path, capsys, bad):
    spec = spec_file(tmp_path, NET)
    d = data(40)
    d["x"][7, 2] = bad
    np.savez(tmp_path / "d.npz", **d)
    out = tmp_path / "trained.npz"
    assert main(["train", str(spec), "--data", str(tmp_path / "d.npz"), "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 2
    assert ("d.npz: input 'x' holds 1 non-finite value (nan or inf in float64)"
            in error_line(capsys))
    assert not out.exists()


def test_fit_refuses_non_finite_data(net):
    d = data()
    d["y"][0, 0] = np.nan
    before = net.get_params()
    with pytest.raises(InputError, match="data: input 'y' holds 1 non-finite value"):
        graphc.fit(net, d, epochs=1, progress=False)
    assert all(np.array_equal(before[k], v) for k, v in net.get_params().items())


# ---------------------------------------------------------------- 6. damaged .npz files

def _damaged(tmp_path: Path, how: str) -> Path:
    """A params file for NET spoiled in one way."""
    good = tmp_path / "good.npz"
    np.savez(good, W=np.ones((3, 5)), b=np.zeros(3))
    raw = good.read_bytes()
    path = tmp_path / f"{how}.npz"
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "crc":   # one byte of W's data flipped: the zip's CRC no longer matches
        at = raw.index(np.ones(1).tobytes()) + 3
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    elif how == "npy":
        np.save(tmp_path / "w.npy", np.ones((3, 5)))
        (tmp_path / "w.npy").rename(path)
    elif how == "text":
        path.write_text("W, b\n1, 2\n")
    elif how == "deflate":   # compressed data damaged: zlib fails before the CRC check
        np.savez_compressed(path, W=np.random.default_rng(0).standard_normal((3, 5)),
                            b=np.zeros(3))
        raw = bytearray(path.read_bytes())
        start = raw.index(b"W.npy") + len("W.npy") + 10
        raw[start:start + 40] = bytes(40)
        path.write_bytes(bytes(raw))
    return path


DAMAGE = ["truncated", "crc", "npy", "text", "deflate"]


@pytest.mark.parametrize("how", DAMAGE)
def test_compile_params_from_a_damaged_file_exits_2(tmp_path, capsys, how):
    out = tmp_path / "c"
    assert main(["compile", str(spec_file(tmp_path, NET)), "-o", str(out),
                 "--params", str(_damaged(tmp_path, how))]) == 2
    assert f"cannot read params from {tmp_path / how}.npz: " in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("how", DAMAGE)
def test_load_params_from_a_damaged_file_is_an_input_error(tmp_path, how):
    with pytest.raises(InputError, match="cannot read params from"):
        graphc.model.load_params(_damaged(tmp_path, how), Graph.from_spec(NET))
    with pytest.raises(InputError, match="cannot read params from"):
        graphc.model.load_params(_damaged(tmp_path, how))


@pytest.mark.parametrize("how", ["truncated", "npy", "text"])
def test_explain_at_a_damaged_file_exits_2(tmp_path, capsys, how):
    assert main(["explain", str(MLP), "--at", str(_damaged(tmp_path, how))]) == 2
    assert "cannot read --at arrays from" in error_line(capsys)


def test_params_zip_bomb_is_refused_unread(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("W.npy", bytes(8 << 20))   # 8 MiB of zeros in a few KiB
        z.writestr("b.npy", bytes(100))
    assert path.stat().st_size < 100_000

    def no_reading(*args, **kwargs):
        raise AssertionError("a member was read")
    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    out = tmp_path / "c"
    assert main(["compile", str(spec_file(tmp_path, NET)), "-o", str(out),
                 "--params", str(path)]) == 2
    assert (f"{path}: param 'W' must be a real array of shape (3, 5), but its member is "
            f"{8 << 20} bytes uncompressed; not read") in error_line(capsys)
    assert not out.exists()


def test_npy_header_cannot_claim_more_than_the_file_holds(tmp_path):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": (1 << 40,)})
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("W.npy", buf.getvalue() + bytes(64))
    with pytest.raises(InputError, match="array 'W': its header claims shape"):
        graphc.model.load_params(path)


# ---------------------------------------------------------------- 7. a damaged cached module

def test_damaged_cached_module_is_rebuilt(tmp_path):
    """Half a .so: dlopen would map it and die of SIGBUS. A fresh process (whose prepared
    entry points at that .so) must rebuild it and run."""
    spec = {**NET, "name": "damaged"}
    so = Path(graphc.compile(spec).built.path)
    raw = so.read_bytes()
    # A new file in its place: this process has the whole one mapped, and truncating that
    # inode would kill it with SIGBUS at its next touch of the module.
    half = so.with_name(so.name + ".half")
    half.write_bytes(raw[:len(raw) // 2])
    os.replace(half, so)
    script = textwrap.dedent(f"""
        import graphc, numpy as np
        m = graphc.compile({spec!r})
        print(m.built.cached, m.verify().ok)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stderr
    assert so.stat().st_size == len(raw)


def test_damaged_module_files_are_not_loaded(net, tmp_path):
    so = Path(net.built.path)
    half = tmp_path / so.name
    half.write_bytes(so.read_bytes()[:len(so.read_bytes()) // 2])
    assert build_mod._elf_truncated(str(half)) and not build_mod._elf_truncated(str(so))
    empty = tmp_path / ("_graphc_empty_0" + so.name[so.name.index("."):])
    empty.write_bytes(b"")
    assert build_mod._load_or_none("_graphc_empty_0", str(empty)) is None
    # A prepared entry whose .so cannot be loaded is "not prepared".
    broken = dataclasses.replace(net.built, path=str(empty))
    build_mod.store_prepared("hostile-test-key", net.cmodule, broken)
    assert build_mod.load_prepared("hostile-test-key") is None


# ---------------------------------------------------------------- 8. an unusable cache

def test_cache_dir_that_is_a_file_exits_2(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(blocker))
    assert main(["check", str(spec_file(tmp_path, {**NET, "name": "nocache"}))]) == 2
    assert (f"cannot use the build cache {blocker}: it is not a directory; set "
            "GRAPHC_CACHE_DIR to a writable directory") in error_line(capsys)


def test_cache_dir_under_a_file_is_a_graphc_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(GraphcError, match=r"cannot use the build cache .*file/sub: Not a "
                                          "directory; set GRAPHC_CACHE_DIR"):
        graphc.compile({**NET, "name": "nocache"})


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to read-only directories")
def test_unwritable_cache_dir_is_a_graphc_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(locked))
    try:
        with pytest.raises(GraphcError, match="Permission denied; set GRAPHC_CACHE_DIR"):
            graphc.compile({**NET, "name": "nocache"})
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- 9. stale build directories

TINY_H = "int tiny_add(int a, int b);\n"
TINY_C = '#include "tiny.h"\nint tiny_add(int a, int b) { return a + b; }\n'


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_stale_build_directories_are_removed_fresh_ones_kept(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(cache))
    old = time.time() - 2 * build_mod.STALE_SECONDS
    stale_dir, fresh_dir = cache / "_graphc_x_0123.tmp-dead", cache / "_graphc_x_0123.tmp-live"
    stale_file = cache / "._graphc_prepared_ab.pickle.k1.tmp"
    fresh_file = cache / "._graphc_prepared_cd.pickle.k2.tmp"
    other = cache / "mine.tmp-keep"   # not graphc's: never touched
    for d in (stale_dir, fresh_dir, other):
        d.mkdir()
        (d / "x.o").write_text("")
    for f in (stale_file, fresh_file):
        f.write_text("")
    for p in (stale_dir, stale_file, other):
        os.utime(p, (old, old))
    built = build_mod.build("tiny", TINY_C, TINY_H, TINY_H)
    assert built.lib.tiny_add(2, 3) == 5
    assert not stale_dir.exists() and not stale_file.exists()
    assert fresh_dir.exists() and fresh_file.exists() and other.exists()


# ---------------------------------------------------------------- 10. specs that never end

def test_spec_that_is_a_device_or_a_fifo_exits_2(tmp_path):
    """/dev/zero reports size 0 and never ends; a FIFO blocks its reader until a writer
    comes. Run apart, with a timeout and a memory limit, so a regression fails, not hangs."""
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from graphc.cli import main
        sys.exit(max(main(["check", p]) for p in sys.argv[1:]))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "zero.yaml"),
                        str(tmp_path / "fifo.yaml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"graphc: error: {tmp_path / 'zero.yaml'}: cannot read spec: it is a character "
            "device, not a regular file") in r.stderr
    assert (f"graphc: error: {tmp_path / 'fifo.yaml'}: cannot read spec: it is a FIFO, not "
            "a regular file") in r.stderr


def test_spec_larger_than_the_limit_through_a_symlink(tmp_path):
    from graphc.spec import MAX_SPEC_BYTES
    big = tmp_path / "big.txt"
    big.write_text("#" * (MAX_SPEC_BYTES + 10))
    (tmp_path / "link.yaml").symlink_to(big)
    with pytest.raises(SpecError, match="spec is larger than"):
        graphc.load(tmp_path / "link.yaml")


# ---------------------------------------------------------------- 11. size bounds

def test_one_huge_param_is_a_spec_error(tmp_path, capsys):
    spec = {**NET, "params": {**NET["params"], "W": {"shape": [16384, 16384]}}}
    with pytest.raises(SpecError) as info:
        Graph.from_spec(spec)
    assert (info.value.node, info.value.field) == ("W", "shape")
    assert f"shape [16384, 16384] has more than {MAX_ELEMENTS} elements" in str(info.value)
    assert main(["compile", str(spec_file(tmp_path, spec)), "-o", str(tmp_path / "c")]) == 2
    assert "node 'W': field 'shape'" in error_line(capsys)


def test_params_too_large_in_total_is_a_spec_error():
    side = 1 << 13   # each within the bound per value, the two together beyond it
    spec = {**NET, "params": {"W": {"shape": [3, 5]}, "b": {"shape": [3]},
                              "P1": {"shape": [side, side - 1]}, "P2": {"shape": [side, side]}}}
    with pytest.raises(SpecError) as info:
        Graph.from_spec(spec)
    assert (info.value.node, info.value.field) == ("P2", "shape")
    assert f"in total, more than {MAX_PARAM_ELEMENTS}" in str(info.value)


def test_a_dimension_beyond_python_s_digit_limit_is_a_spec_error():
    spec = {**NET, "params": {**NET["params"], "W": {"shape": [3, 10 ** 5000]}}}
    with pytest.raises(SpecError, match="a dimension has more than"):
        Graph.from_spec(spec)


def test_the_widest_benchmark_model_fits():
    from benchmarks.workloads import spec
    graph = Graph.from_spec(spec((4096, 4096, 10)))
    assert sum(int(np.prod(v.shape)) for v in graph.params.values()) > 16_000_000


# ---------------------------------------------------------------- 12. max batch

@pytest.mark.parametrize("value", ["0", str(10 ** 29), str(2 ** 24 + 1)])
def test_absurd_max_batch_exits_2(tmp_path, capsys, value):
    assert main(["compile", str(MLP), "-o", str(tmp_path / "c"), "--max-batch", value]) == 2
    assert f"--max-batch must lie in 1..16777216 (2^24), got {value}" in error_line(capsys)
    assert not (tmp_path / "c").exists()


def test_max_batch_bounds_in_generate():
    with pytest.raises(InputError, match=r"max_batch must be an integer from 1 to 16777216 "
                                         r"\(2\^24\), got 100000000000000000000000000000"):
        graphc.generate(NET, max_batch=10 ** 29)
    with pytest.raises(InputError, match="got a larger integer"):
        graphc.generate(NET, max_batch=10 ** 5000)
    # 2^24 examples of the MLP's work (5.8 GB) do not fit a 32-bit Cortex-M's size_t.
    with pytest.raises(InputError, match=r"max_batch 16777216: the work arena for it would "
                                         r"take \d+ bytes, more than a static array on "
                                         r"target 'cortex-m0' can hold"):
        graphc.generate(MLP, target="cortex-m0", max_batch=1 << 24)


# ---------------------------------------------------------------- 13. Python keywords

@pytest.mark.parametrize("section, name", [("inputs", "assert"), ("inputs", "lambda"),
                                           ("params", "import"), ("params", "None"),
                                           ("nodes", "yield")])
def test_python_keyword_names_are_refused(section, name):
    spec = {**NET, section: {**NET[section], name: {"shape": [3]} if section != "nodes"
                             else {"op": "relu", "inputs": ["logits"]}}}
    with pytest.raises(SpecError) as info:
        Graph.from_spec(spec)
    assert (info.value.node, info.value.field) == (name, section)
    assert f"name '{name}' is a Python keyword" in str(info.value)


def test_soft_keywords_remain_usable():
    spec = {**NET, "nodes": {**NET["nodes"], "match": {"op": "elementwise",
                                                        "inputs": ["logits"],
                                                        "expr": "2 * logits"}},
            "outputs": ["logits", "match"]}
    spec["nodes"]["type"] = {"op": "elementwise", "inputs": ["match"], "expr": "match + 1"}
    spec["outputs"].append("type")
    assert "type" in Graph.from_spec(spec).nodes


# ---------------------------------------------------------------- 14. compile builds what it writes

def _bad_generate(real):
    def generate(*args, **kwargs):
        graph, cm = real(*args, **kwargs)
        extra = "int hostile_extra(void);\nint hostile_extra(void) { int unused = 1; return 0; }\n"
        return graph, dataclasses.replace(cm, source=cm.source + extra)
    return generate


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_compile_refuses_c_that_does_not_compile_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(graphc, "generate", _bad_generate(graphc.generate))
    out = tmp_path / "c"
    spec = spec_file(tmp_path, NET)
    assert main(["compile", str(spec), "-o", str(out)]) == 2
    err = error_line(capsys)
    assert ("graphc: error: the generated C for 'hostile' does not compile cleanly: "
            "hostile.c:") in err
    assert "unused" in err and err.rstrip().endswith("; nothing written")
    assert not out.exists()


def test_compile_without_a_compiler_writes_and_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    out = tmp_path / "c"
    assert main(["compile", str(spec_file(tmp_path, NET)), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphc: warning: no C compiler found")
    assert (out / "hostile.c").exists() and (out / "hostile.h").exists()
