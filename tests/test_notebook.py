"""What a notebook shows: `summary()`, the HTML of Graph, CompiledModel, History and the verify
report, History's figure, and the example notebook run in a real kernel (nbclient)."""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

import graphc
from graphc.display import Summary
from graphc.errors import GraphcError, InputError
from graphc.train import History
from graphc.verify import Check, VerifyReport

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples/digits/notebook.ipynb"


@pytest.fixture(scope="module")
def mlp():
    return graphc.compile(ROOT / "examples/mlp.yaml")


def _summary_text(summarize, **kwargs) -> str:
    lines = []
    assert summarize(print_fn=lines.append, **kwargs) is None   # printed, as Keras does
    (text,) = lines
    return text


# ---------------------------------------------------------------- summary

def test_model_summary_has_a_row_per_node_and_the_c_memory(mlp):
    text = _summary_text(mlp.summary)
    # W1 [32, 64] and b1 [32]: 2,080 floats, each kept as value, gradient and Adam's two slots
    assert re.search(r"^h1\s+dense\s+x, W1, b1\s+\(None, 32\)\s+2,080\s+33,280$", text, re.M)
    assert re.search(r"^loss\s+softmax_cross_entropy\s+logits, y\s+\(None,\)\s+0\s+0$", text,
                     re.M)
    assert re.search(r"^x\s+input\s+\(None, 64\)\s+0\s+0$", text, re.M)
    assert 'Model "mlp" (float32, target host, adam)' in text
    assert "Total params:         2,410" in text and "Non-trainable params: 0" in text
    assert re.search(r"work arena:\s+10,304 B \(10\.1 KiB\) at batch 1 \(\+576 B per example\)",
                     text), text
    bigger = _summary_text(mlp.summary, batch=33)
    assert f"{10_304 + 32 * 576:,} B" in bigger and "at batch 33" in bigger


def test_node_bytes_add_up_to_the_memory_report(mlp):
    """Per node, its params' values, gradients and optimizer slots; with the step count and
    Adam's four hyperparameters (lr, 1 - beta1, 1 - beta2, eps; weight decay) the column
    sums to the report's params + gradients + optimizer state."""
    s = Summary(mlp.graph, mlp.cmodule)
    m = s.memory
    scalars = (1 + 5) * mlp.dtype.itemsize
    assert sum(r[5] for r in s.rows) + scalars == \
        m["params"] + m["gradients"] + m["optimizer_state"]
    assert sum(r[4] for r in s.rows) == s.trainable == 2410


def test_graph_summary_prints_without_c_memory(capsys):
    g = graphc.load(ROOT / "examples/bn_cnn.yaml")
    assert g.summary() is None
    text = capsys.readouterr().out
    assert text.startswith('Graph "bn_cnn"') and "C bytes" not in text and "C memory" not in text
    # batch norm's running mean and variance (16 each) are not trained
    assert "Non-trainable params: 32" in text
    assert re.search(r"^bn\s+batch_norm\s+h, gamma, beta, mean, var\s+\(None, 16, 8, 8\)\s+64$",
                     text, re.M)


def test_a_shared_param_counts_once_at_its_first_reader():
    g = graphc.Graph.from_spec({
        "name": "shared", "inputs": {"x": [3]}, "params": {"W": [3, 3]},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                  "k": {"op": "dense", "inputs": ["h", "W"]}},
        "outputs": ["k"]})
    rows = {r[0]: r for r in Summary(g).rows}
    assert rows["h"][4] == 9 and rows["k"][4] == 0


def test_summary_batch_must_be_a_positive_integer(mlp):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="batch must be an integer from 1 to"):
            mlp.summary(batch=bad)


# ---------------------------------------------------------------- Graph, CompiledModel

HOSTILE = {"name": "hostile", "description": "<script>alert('spec')</script> & more",
           "inputs": {"x": [2]}, "params": {"W": [1, 2]},
           "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]}}, "outputs": ["h"]}


def test_graph_html_draws_the_graph_and_escapes_the_spec():
    page = graphc.Graph.from_spec(HOSTILE)._repr_html_()
    assert "<script>" not in page
    assert html.escape(HOSTILE["description"]) in page
    assert "<th>output shape</th>" in page and "<td>(None, 1)</td>" in page
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed: the picture is not drawn")
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert "<?xml" not in page and ">dense &#160;[1]</text>" in svg, svg


def test_graph_html_without_graphviz_is_the_table_and_a_note(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)   # no `dot`
    page = graphc.load(ROOT / "examples/mlp.yaml")._repr_html_()
    assert "<svg" not in page and "install Graphviz" in page
    assert "<td>logits</td><td>dense</td><td>a1, W2, b2</td>" in page


def test_graph_html_when_drawing_fails_is_the_table_and_why(monkeypatch):
    def broken(dot, fmt):
        raise GraphcError("Graphviz's dot failed: out of memory")
    # (graphc.explain is also a function's name: the module is reached through importlib)
    monkeypatch.setattr(importlib.import_module("graphc.dot"), "render_dot", broken)
    page = graphc.load(ROOT / "examples/mlp.yaml")._repr_html_()
    assert "could not be drawn: Graphviz&#x27;s dot failed: out of memory" in page
    assert "<td>h1</td><td>dense</td>" in page


def test_model_html_shows_the_build_and_the_summary(mlp):
    page = mlp._repr_html_()
    for fact in ("<td>dtype</td><td>float32</td>", "<td>target</td><td>host</td>",
                 "mlp_forward, mlp_evaluate, mlp_gradients, mlp_train_step",
                 "adam (lr 0.001", "<th class=\"number\">C bytes</th>", "33,280"):
        assert fact in page, fact


# ---------------------------------------------------------------- History

def _history(epochs: int = 3) -> History:
    h = History()
    h.epochs = [{"loss": 1.0 / k, "accuracy": 0.5 + k / 10, "val_loss": 1.2 / k,
                 "val_accuracy": 0.4 + k / 10} for k in range(1, epochs + 1)]
    h.steps, h.seconds = 10 * epochs, 0.5
    return h


def test_plot_returns_a_figure_that_shows_itself_as_svg():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    history = _history()
    fig = history.plot()
    assert isinstance(fig, Figure)
    loss_axis, metric_axis = fig.axes
    assert [line.get_label() for line in loss_axis.lines] == ["loss", "val loss"]
    assert [line.get_label() for line in metric_axis.lines] == ["accuracy", "val accuracy"]
    assert list(metric_axis.lines[1].get_ydata()) == history["val_accuracy"]
    assert fig._repr_svg_().startswith("<svg")
    assert loss_axis.get_title() == "3 epochs, 30 steps, 0.5 s"


@pytest.mark.parametrize("name, magic", [("loss.png", b"\x89PNG"), ("loss.svg", b"<?xml"),
                                         ("loss.pdf", b"%PDF"), ("loss", b"\x89PNG")])
def test_plot_saves_in_the_format_of_the_suffix(tmp_path, name, magic):
    pytest.importorskip("matplotlib")
    fig = _history().plot(tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic) and fig is not None


def test_plot_to_an_unknown_format_is_one_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(GraphcError, match=r"cannot save the plot as .*loss\.xyz: .*xyz"):
        _history().plot(tmp_path / "loss.xyz")


def test_history_html_has_the_curves_and_the_last_epoch():
    pytest.importorskip("matplotlib")
    page = _history()._repr_html_()
    assert "<svg" in page and "3 epochs, 30 steps, 0.5 s" in page
    assert ">val_accuracy</th>" in page and "<td class=\"number\">0.7</td></tr>" in page
    empty = History()._repr_html_()
    assert "no epoch completed" in empty and "<svg" not in empty


def test_history_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import fails
    page = _history()._repr_html_()
    assert "pip install matplotlib" in page and ">val_loss</th>" in page
    with pytest.raises(GraphcError, match="plotting needs matplotlib"):
        _history().plot()


# ---------------------------------------------------------------- the verify report

def test_verify_html_is_the_reports_table_escaped():
    report = VerifyReport("m", "float32", 4, [
        Check("logits", "C vs reference", 1e-7, 1e-8, 1e-4, True),
        Check("d loss/d W", "C vs reference", 0.5, 0.25, 1e-4, False, note="<b>far</b> off")])
    page = report._repr_html_()
    assert "<td>logits</td><td>C vs reference</td><td>1.000e-07</td>" in page
    assert '<td class="bad">MISMATCH [1]</td>' in page
    assert "&lt;b&gt;far&lt;/b&gt; off" in page and "<b>far" not in page
    assert html.escape(report.table().splitlines()[-1]) in page   # the table's own verdict


# ---------------------------------------------------------------- a real notebook

def _cell(nb, start: str):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start))


def _data(cell, output_type: str = "execute_result") -> dict:
    (out,) = [o for o in cell.outputs if o.output_type == output_type]
    return out.data


def test_example_notebook_runs_with_rich_output(tmp_path, monkeypatch):
    """examples/digits/notebook.ipynb in an ipykernel, as Jupyter runs it: every display
    is HTML (the graph drawn as SVG), the plot an SVG image, fit's progress bars widgets."""
    nbclient = pytest.importorskip("nbclient", reason="nbclient runs the notebook "
                                   "(pip install -e '.[test]')")
    import nbformat
    assert importlib.util.find_spec("ipykernel"), \
        "the kernel is ipykernel, which comes with nbclient in .[test]: pip install ipykernel"
    for needed in ("sklearn", "matplotlib"):   # the example's own needs: .[examples]
        pytest.importorskip(needed)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is this interpreter, whatever "python3" kernel the user has installed
    # elsewhere (JUPYTER_PATH comes first), with this environment: the graphc under test,
    # the suite's build cache.
    spec = tmp_path / "kernels" / "graphc-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "graphc's tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="graphc-test",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                            ).execute(env=env)   # raises on a cell's error

    graph = _data(_cell(nb, "import graphc"))["text/html"]
    assert "Graph &#x27;digits&#x27;" in graph
    assert ("<svg" in graph) == (shutil.which("dot") is not None)
    (summary,) = _cell(nb, "graph.summary()").outputs
    assert summary.name == "stdout" and "Trainable params:     2,410" in summary.text
    assert "digits_train_step" in _data(_cell(nb, "model = "))["text/html"]
    (summary,) = _cell(nb, "model.summary(").outputs
    assert "at batch 32" in summary.text

    # one widget per epoch (tqdm.auto; without ipywidgets, text and a warning on stderr)
    progress = [sorted(o.get("data", ())) for o in _cell(nb, "train, test = ").outputs]
    assert progress == [["application/vnd.jupyter.widget-view+json", "text/plain"]] * 5, \
        progress

    (shown,) = [c for c in nb.cells if c.source == "history"]
    assert "<svg" in _data(shown)["text/html"]
    assert _data(_cell(nb, "history.plot()"))["image/svg+xml"].startswith("<svg")
    verify = _data(_cell(nb, "model.verify("))["text/html"]
    assert "<table>" in verify and 'class="bad"' not in verify
    # (Text on stderr alone may be harmless: matplotlib says when it builds its font cache.)
    for cell in nb.cells:
        assert not [o for o in cell.get("outputs", ()) if o.output_type == "error" or (
            o.get("name") == "stderr" and re.search("Warning|Traceback", o.text))], cell.source
