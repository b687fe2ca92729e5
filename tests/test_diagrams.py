"""The data-flow diagram helper: names are checked, and the drawing holds one box per node and one arrow per edge."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from medvqa.diagrams import DataFlow, shape_text


def test_shape_text():
    assert shape_text(("B", 3, 64)) == "[B, 3, 64]"
    assert shape_text([]) == "[]"
    assert shape_text("[B, D]") == "[B, D]"


def test_names_and_kinds_are_checked():
    flow = DataFlow("t").add("a", "A", 0, 0).add("b", "B", 1, 0, "module")
    with pytest.raises(KeyError, match="no node named 'c'"):
        flow.connect("a", "c")
    with pytest.raises(ValueError, match="already exists"):
        flow.add("a", "again", 2, 0)
    with pytest.raises(ValueError, match="node kind"):
        flow.add("d", "D", 2, 0, kind="cloud")
    with pytest.raises(ValueError, match="no nodes"):
        DataFlow("empty").draw()


def test_drawing_holds_every_node_edge_and_shape():
    flow = (DataFlow("three").add("x", "input", 0, 0, shape=("B", 4)).add("f", "encoder", 1, 0, "frozen")
            .add("y", "loss", 2, 1, "loss", shape="Eq. 1").connect("x", "f").connect("f", "y", "features"))
    ax = flow.draw()
    assert sum(isinstance(p, FancyBboxPatch) for p in ax.patches) == 3
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 2
    texts = [t.get_text() for t in ax.texts]
    assert "input\n[B, 4]" in texts and "loss\nEq. 1" in texts and "features" in texts
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert x0 < 0 < 2 < x1 and y0 < 0 < 1 < y1  # every node inside the view
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tensor", "frozen", "loss"]  # only the kinds used
    plt.close(ax.figure)


def test_a_long_label_is_shrunk_to_fit_its_box():
    flow = (DataFlow("fit").add("t", "entity text", 0, 0, shape="name | relation | definition")
            .add("u", "short", 1, 0))
    ax = flow.draw(fontsize=8.5)
    renderer = ax.figure.canvas.get_renderer()
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    by_text = {t.get_text().split("\n")[0]: t for t in ax.texts}
    long_box, long_text = boxes[0].get_window_extent(renderer), by_text["entity text"].get_window_extent(renderer)
    assert long_text.width <= 0.9 * long_box.width and long_text.height <= 0.9 * long_box.height
    assert long_box.x0 < long_text.x0 and long_text.x1 < long_box.x1  # inside, not only narrower
    assert by_text["entity text"].get_fontsize() < 8.5  # it had to shrink
    assert by_text["short"].get_fontsize() == 8.5  # a label that fits keeps its size
    plt.close(ax.figure)
