"""`triaxis plot`: the picture of one or more runs (issue 27, item 5)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from triaxis.cli import main

SVG = "{http://www.w3.org/2000/svg}"


def _run(path, steps: list[int], scale: float, val_every: int = 2) -> str:
    path.mkdir()
    lines = []
    for s in steps:
        lines.append(
            {"step": s, "loss": scale * 5 / s, "tokens_per_s": 100.0 * s, "grad_norm": 1.0 / s}
        )
        if s % val_every == 0:
            lines.append({"step": s, "val_loss": scale * 6 / s})
    lines.append({"step": steps[-1], "checkpoint_blocking_s": 0.1})  # not plotted
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def test_plot_overlays_runs_in_four_panels(tmp_path, capsys):
    a = _run(tmp_path / "lr3e-3", [1, 2, 3, 4, 5, 6], 1.0)
    b = _run(tmp_path / "lr1e-3", [1, 2, 3, 4], 2.0)
    out = tmp_path / "runs.svg"
    assert main(["plot", a, b, "-o", str(out)]) == 0
    assert "2 run(s), 8 series" in capsys.readouterr().out
    root = ET.parse(out).getroot()
    lines = root.findall(f"{SVG}polyline")
    # loss, val_loss, tokens/s, grad norm: one line per run in each
    counts = sorted(len(p.get("points").split()) for p in lines)
    assert counts == sorted([6, 4, 3, 2, 6, 4, 6, 4])
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"lr3e-3", "lr1e-3", "validation loss", "gradient norm (pre-clip)"} <= set(texts)
    # Every point lies inside the picture.
    width, height = float(root.get("width")), float(root.get("height"))
    for p in lines:
        for xy in p.get("points").split():
            x, y = map(float, xy.split(","))
            assert 0 <= x <= width and 0 <= y <= height


def test_plot_refuses_a_folder_without_metrics_and_a_png_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr()
    assert "no metrics.jsonl" in err.out + err.err
    assert len((err.out + err.err).strip().splitlines()) == 1
    a = _run(tmp_path / "a", [1, 2], 1.0)
    assert main(["plot", a, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr()
    assert "*.svg" in err.out + err.err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.svg").exists()
