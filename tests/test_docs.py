"""`lossdsl docs`: the Markdown catalog of the library, and that the committed docs/ is current."""
from __future__ import annotations

from pathlib import Path

import pytest

import lossdsl
from lossdsl import docs
from lossdsl.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def catalog():
    return docs.catalog()


def test_one_page_per_library_loss_and_an_index(catalog):
    assert set(catalog) == {"README.md"} | {f"{n}.md" for n in lossdsl.names()}
    for n in lossdsl.names():
        assert f"[{n}]({n}.md)" in catalog["README.md"]


def test_a_page_has_every_part(catalog):
    text = catalog["focal.md"]
    for part in ("# focal", "Focal loss (Lin et al., 2017, RetinaNet)", "## Definition",
                 "| param | `gamma` | nonnegative | 2 |", "| target | `y` | unit |  |",
                 "## Loss and gradients", "d loss / d z = -α·σ(-z)^γ·(σ(-z) + γ·σ(z)·softplus(-z))  if y = 1",
                 "## Rules fired", "- `log_sigmoid`: log σ(x) = -softplus(-x)", "## Reference",
                 "torchvision.ops.sigmoid_focal_loss", "![focal](focal.png)"):
        assert part in text, part
    assert "d loss / d z[j] = softmax(z)[j] - (1 - label_smoothing)·[j = y] - label_smoothing/K" \
        in catalog["cross_entropy.md"]
    assert "![ntxent]" not in catalog["ntxent.md"]        # batch losses have no plot


@pytest.mark.skipif(not DOCS.is_dir(), reason="no docs/ folder next to tests/ (not a source checkout)")
def test_committed_docs_are_not_stale(catalog):
    """Everything but the accuracy figures (the audit runs the kernels: slow, and their last bits
    may differ between processors); that section must be there, from `lossdsl docs`."""
    stale = [name for name, text in catalog.items()
             if not (DOCS / name).is_file() or docs.without_accuracy((DOCS / name).read_text()) != text]
    assert not stale, f"docs/ is stale ({', '.join(stale)}): run `lossdsl docs` from the repository root"
    for name in lossdsl.names():
        if f"![{name}]({name}.png)" in catalog[f"{name}.md"]:
            assert (DOCS / f"{name}.png").is_file(), name
        assert "\n| value | float64 |" in (DOCS / f"{name}.md").read_text(), f"{name}: no accuracy figures"


def test_accuracy_section_has_both_dtypes_and_every_output():
    lines = docs.accuracy_section(lossdsl.load("huber"), points=5)
    assert lines[0] == docs.ACCURACY_HEAD
    rows = [line for line in lines if line.startswith("| ") and "mean" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| value", "float64"], ["| yhat", "float64"],
                                                  ["| value", "float32"], ["| yhat", "float32"]]
    page = "# x\n\n" + "\n".join(lines) + "\n## Plot\n"
    assert docs.without_accuracy(page) == "# x\n\n## Plot\n"


def test_docs_command_writes_the_markdown(capsys, tmp_path):
    rc = main(["docs", "-o", str(tmp_path), "--no-plots", "--no-accuracy"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert (tmp_path / "README.md").is_file() and (tmp_path / "bce.md").is_file()
    assert not list(tmp_path.glob("*.png"))
