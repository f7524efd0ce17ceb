"""The smoke book: every chapter executes once and the HTML book builds from those runs."""

from __future__ import annotations

import json
import re

from chexanatomy_lib.pipeline import BOOK_ORDER, STAGES


def test_every_chapter_executed_once_with_provenance(smoke_run):
    assert [r.stage for r in smoke_run.stages] == [s for s in STAGES if s in BOOK_ORDER]
    for r in smoke_run.stages:
        prov = json.loads((r.directory / "provenance.json").read_text())
        assert prov["status"] == "ok", r.stage
        assert prov["profile"] == "smoke"
        assert (r.directory / f"{r.stage}.ipynb").exists()
        assert json.loads((r.directory / "params.json").read_text())["seed"] == 0


def test_html_book_has_every_chapter_with_figures(smoke_run):
    html = smoke_run.html_dir
    assert (html / "index.html").exists()
    for stage in BOOK_ORDER:
        page = html / "_chapters" / f"{stage}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Traceback" not in text, f"{stage} shows a traceback"
        assert "injected-parameters" not in text, f"{stage} shows papermill's injected parameters"
        # Every chapter shows at least one figure (embedded PNGs land in _images/).
        assert re.search(r"<img[^>]+_images/", text), f"{stage} has no figure"
    assert (html / "book" / "reproducing.html").exists()


def test_introduction_reports_each_chapter_time(smoke_run):
    text = (smoke_run.html_dir / "_chapters" / "00_introduction.html").read_text()
    for stage in BOOK_ORDER[1:]:
        assert f"{stage[:2]} {STAGES[stage].title}" in text
    assert "wall time (s)" in text


def test_book_renders_the_executions_without_executing_again(smoke_run):
    # The line the introduction printed when the runner executed it must appear
    # verbatim in the HTML: Jupyter Book rendered that execution, it did not run its own.
    nb = json.loads((smoke_run.run_dir / "00_introduction" / "00_introduction.ipynb").read_text())
    printed = [
        "".join(o.get("text", ""))
        for c in nb["cells"]
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream" and "all chapters:" in "".join(o.get("text", ""))
    ]
    assert printed, "the introduction printed no total"
    line = printed[0].strip().splitlines()[0]
    assert line in (smoke_run.html_dir / "_chapters" / "00_introduction.html").read_text()


def test_the_book_shows_each_chapters_parameters_once_without_machine_paths():
    from chexanatomy_lib.book import reader_notebook

    def cell(source, tags):
        return {"cell_type": "code", "metadata": {"tags": tags}, "source": source, "outputs": []}

    nb = {"cells": [cell('run_dir = "runs/default"  # where\nseed = 0  # seed\nsteps = 900  # steps\n', ["parameters"]),
                    cell('# Parameters\nrun_dir = "/home/someone/runs/gpu"\nseed = 0\nsteps = 3000\n',
                         ["injected-parameters"]),
                    cell("print(steps)", [])]}
    shown = reader_notebook(nb)
    assert [c["metadata"]["tags"] for c in shown["cells"]] == [["parameters"], []]
    source = shown["cells"][0]["source"]
    assert "/home/someone" not in source and "#   steps = 3000" in source and "#   seed" not in source
    assert nb["cells"][1]["metadata"]["tags"] == ["injected-parameters"]  # the run's own notebook is untouched
    unchanged = reader_notebook({"cells": [nb["cells"][0], cell('run_dir = "/x"\n', ["injected-parameters"])]})
    assert unchanged["cells"][0]["source"] == nb["cells"][0]["source"]  # nothing set but the run directory
