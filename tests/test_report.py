"""`dist-train report`: PNGs, a self-contained report.html and a text summary from real digits runs,
one run and two overlaid; the summary's numbers recomputed here from metrics.jsonl; one-line errors
that write nothing."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, metrics_records, tiny_overrides
from PIL import Image

import dist_train
from dist_train.cli import main
from dist_train.tools.report import default_out, load_runs

pytestmark = pytest.mark.system

DIGITS = str(REPO / "configs" / "digits.yaml")
JOB = {
    "train.max_steps": 30,
    "train.log_every": 5,
    "train.eval_every": 10,
    "checkpoint.every_steps": 0,
    "parallel.strategy": "none",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1: the first and second run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real runs: `a` as configs/digits.yaml; `b` with another lr and no metric beyond val_loss."""
    root = tmp_path_factory.mktemp("report")
    dist_train.fit(DIGITS, tiny_overrides(root, **JOB, **{"run.name": "a"}))
    dist_train.fit(DIGITS, tiny_overrides(root, **JOB, **{"run.name": "b", "optim.lr": 0.01, "train.metrics": "[]"}))
    return root / "runs" / "a", root / "runs" / "b"


def _records(run_dir: Path) -> list[dict]:
    return metrics_records(run_dir)


def _report(capsys, *args: str) -> str:
    code = main(["report", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    return captured.out


class _Links(HTMLParser):
    """Every tag, and every src/href, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action"):
                self.links.append((tag, name, value or ""))
                if tag == "img" and name == "src":
                    self.images.append(value or "")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    from io import BytesIO

    image = Image.open(BytesIO(data))
    image.verify()  # decodes every chunk and checks its CRC
    return image.size


def _has_color(path: Path, rgb: tuple[int, int, int]) -> bool:
    """Whether a line of this colour is drawn: its pixels, antialiased towards the white around them."""
    pixels = Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)
    return any(sum((c - r) ** 2 for c, r in zip(color, rgb, strict=True)) < 60**2 for _, color in pixels)


def _check_page(out: Path, pngs: list[str]) -> str:
    """report.html stands alone: its images are data: URIs of exactly the PNGs written beside it."""
    page = (out / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert len(parser.links) == len(parser.images) == len(pngs), parser.links
    embedded = []
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert _png_size(data)[0] > 100
        embedded.append(data)
    assert embedded == [(out / name).read_bytes() for name in pngs]
    return page


def _summary_lines(stdout: str) -> dict[str, dict]:
    """The text summary parsed back into numbers, per run."""
    runs: dict[str, dict] = {}
    for line in stdout.splitlines():
        head = re.fullmatch(
            r"(\S+): (\d+) steps, wall time ([\d.]+) s \(steps (\d+)-\2\), mean ([\d.]+) samples/s", line
        )
        metric = re.fullmatch(
            r"  (val_\w+)\s+(?:best (\S+) \(step (\d+)\)|best n/a)\s+final (\S+) \(step (\d+)\)", line
        )
        if head:
            name = head[1]
            runs[name] = {"steps": int(head[2]), "wall": float(head[3]), "from": int(head[4]), "val": {}}
            runs[name]["speed"] = float(head[5])
        elif metric:
            best = (float(metric[2]), int(metric[3])) if metric[2] else None
            runs[name]["val"][metric[1]] = {"best": best, "final": (float(metric[4]), int(metric[5]))}
    return runs


def _expected_summary(run_dir: Path) -> dict:
    """The same numbers, computed here from metrics.jsonl."""
    records = _records(run_dir)
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    times = [r["time"] for r in records]
    val = {}
    for key in sorted({k for r in records for k in r if k.startswith("val_")}):
        points = [(r[key], r["step"]) for r in records if key in r]
        higher_better = key.removeprefix("val_") in ("acc", "top5", "precision", "recall", "f1")
        best_value = max(v for v, _ in points) if higher_better else min(v for v, _ in points)
        best_step = next(s for v, s in points if v == best_value)
        val[key] = {"best": (best_value, best_step), "final": points[-1]}
    return {
        "steps": max(r["step"] for r in records),
        "wall": times[-1] - times[0],
        "from": records[0]["step"],
        "speed": sum(speeds) / len(speeds),
        "val": val,
    }


def _assert_summary(parsed: dict, run_dir: Path) -> None:
    expected = _expected_summary(run_dir)
    assert parsed["steps"] == expected["steps"] == 30
    assert parsed["wall"] == pytest.approx(expected["wall"], abs=0.051)
    assert parsed["from"] == expected["from"] == 5  # the first logged step, where the wall time starts
    assert parsed["speed"] == pytest.approx(expected["speed"], abs=0.051)
    assert sorted(parsed["val"]) == sorted(expected["val"])
    for key, numbers in expected["val"].items():
        best, final = parsed["val"][key]["best"], parsed["val"][key]["final"]
        assert best[0] == pytest.approx(numbers["best"][0], rel=5e-4) and best[1] == numbers["best"][1], key
        assert final[0] == pytest.approx(numbers["final"][0], rel=5e-4) and final[1] == numbers["final"][1] == 30


def test_a_report_of_one_run(runs, capsys):
    a, _ = runs
    stdout = _report(capsys, str(a))
    out = a / "report"  # the default for one run
    pngs = ["loss.png", "val_metrics.png", "lr.png", "throughput.png", "memory.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", *pngs])
    for name in pngs:
        width, height = _png_size((out / name).read_bytes())
        assert width > 300 and height > 200, name
    page = _check_page(out, pngs)
    assert "val_acc" in page and "seed_cnn on digits, sgd lr 0.05" in page

    parsed = _summary_lines(stdout)
    assert list(parsed) == ["a"]
    _assert_summary(parsed["a"], a)
    assert list(parsed["a"]["val"])[:2] == ["val_loss", "val_acc"]  # the loss first
    assert stdout.splitlines()[-1].startswith(f"wrote {out / 'report.html'} and 5 plots")
    assert _has_color(out / "loss.png", BLUE) and not _has_color(out / "loss.png", ORANGE)


def test_a_plot_whose_keys_no_run_has_is_left_out(runs, capsys):
    _, b = runs  # validated with val_loss only: no metric for val_metrics.png
    stdout = _report(capsys, str(b))
    pngs = ["loss.png", "lr.png", "throughput.png", "memory.png"]
    assert sorted(p.name for p in (b / "report").iterdir()) == sorted(["report.html", *pngs])
    _check_page(b / "report", pngs)
    assert list(_summary_lines(stdout)["b"]["val"]) == ["val_loss"]


def test_two_runs_are_overlaid_and_summarized(runs, capsys, tmp_path):
    a, b = runs
    out = tmp_path / "compare"
    stdout = _report(capsys, str(a), str(b), "--out", str(out))
    pngs = ["loss.png", "val_metrics.png", "lr.png", "throughput.png", "memory.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", *pngs])
    page = _check_page(out, pngs)
    assert "seed_cnn on digits, sgd lr 0.01" in page
    parsed = _summary_lines(stdout)
    assert list(parsed) == ["a", "b"]
    _assert_summary(parsed["a"], a)
    _assert_summary(parsed["b"], b)
    # Each run in its own colour: both in every plot they share, only `a` where only `a` has data.
    for name in ("loss.png", "lr.png", "throughput.png", "memory.png"):
        assert _has_color(out / name, BLUE) and _has_color(out / name, ORANGE), name
    assert _has_color(out / "val_metrics.png", BLUE) and not _has_color(out / "val_metrics.png", ORANGE)
    # Without --out several runs go beside them, named after them.
    assert default_out(load_runs([a, b])) == a.parent.resolve() / "compare-a-b"


@pytest.mark.parametrize("problem", ["missing", "no-metrics", "empty", "torn-only", "out-is-a-file"])
def test_a_run_without_records_is_one_line_and_nothing_is_written(runs, capsys, tmp_path, problem):
    a, _ = runs
    bad = tmp_path / "bad"
    if problem != "missing":
        bad.mkdir()
    if problem in ("empty", "torn-only"):
        (bad / "metrics.jsonl").write_text("" if problem == "empty" else '{"step": 3, "loss": 2.')
    args = [str(a), str(bad)]
    if problem == "out-is-a-file":
        (tmp_path / "taken").write_text("mine\n")
        args = [str(a), "--out", str(tmp_path / "taken")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    before_run = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*"))

    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    expected = {
        "missing": f"{bad}: no such run directory",
        "no-metrics": f"{bad / 'metrics.jsonl'} not found",
        "empty": f"{bad / 'metrics.jsonl'} holds no records",
        "torn-only": f"{bad / 'metrics.jsonl'} holds no records",
        "out-is-a-file": f"--out {tmp_path / 'taken'} is a file",
    }[problem]
    assert expected in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.relative_to(a.parent) for p in a.parent.rglob("*")) == before_run
    if problem == "out-is-a-file":
        assert (tmp_path / "taken").read_text() == "mine\n"
