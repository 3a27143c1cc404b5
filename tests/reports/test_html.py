"""index.html: valid, balanced, escaped, offline, and every image and link it references exists."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from robustkit.reports.html import render_index
from robustkit.reports.plots import plan_plots
from robustkit.reports.records import load_run
from robustkit.reports.summary import ACCURACY_NOTE, INTERVAL_NOTE, TABLE_HEADERS, summary_frame
from tests.reports.runs import CELLS, CONFIG

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class Page(HTMLParser):
    """Collects tags, attributes and text, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.errors.append(f"self-closing <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void element {tag}")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def attributes(self, tag: str, name: str) -> list[str]:
        return [str(attrs[name]) for t, attrs in self.tags if t == tag and attrs.get(name) is not None]


@pytest.fixture(scope="module")
def page(built_run):
    folder, _ = built_run
    parser = Page()
    parser.feed((folder / "index.html").read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_page_is_balanced_html5(page):
    assert page.doctype == "DOCTYPE html"
    assert page.errors == [] and page.stack == []
    assert [t for t, _ in page.tags][:3] == ["html", "head", "meta"]
    assert page.tags[0][1] == {"lang": "en"} and page.tags[2][1] == {"charset": "utf-8"}
    ids = page.attributes("section", "id")
    assert len(ids) == len(set(ids)) == 2


def test_every_referenced_file_exists(built_run, page):
    folder, written = built_run
    images = page.attributes("img", "src")
    assert len(images) == 7  # four plots of the main group, three of the one without an eps sweep
    links = page.attributes("a", "href")
    assert {"results.csv", "epochs.csv", "summary.csv", "summary.md"} <= set(links)
    for reference in [*images, *links]:
        assert urlparse(reference).scheme == "" and not reference.startswith(("/", "//")), reference
        assert (folder / unquote(reference)).is_file(), reference
    pngs = {p.relative_to(folder).as_posix() for p in written if p.suffix == ".png"}
    assert set(images) == pngs  # every plot is shown
    assert all(alt for alt in page.attributes("img", "alt"))


def test_page_is_self_contained(built_run, page):
    source = (built_run[0] / "index.html").read_text(encoding="utf-8")
    assert not any(t in {"script", "link", "iframe", "object"} for t, _ in page.tags)
    assert "http://" not in source and "https://" not in source and "url(" not in source and "@import" not in source


def test_text_is_escaped_and_shown(page, built_run):
    source = (built_run[0] / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in source and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in source
    text = "".join(page.text)
    assert CONFIG in text  # the configuration reads back exactly once the entities are decoded
    assert ACCURACY_NOTE in text and INTERVAL_NOTE in text
    assert "Complete verifier on the undecided band: bab, at most 2 s per sample." in text  # under its table
    assert "98.4% (97.4-99.0)" in text  # every accuracy with its 95% interval, as in summary.md
    for header in TABLE_HEADERS:
        assert header in text
    for label in CELLS:
        assert label in text
    assert "15.0x" in text and "98.4%" in text and "n/a" in text


def test_hostile_labels_are_escaped(run_dir):
    records = load_run(run_dir)
    records.results.loc[records.results["trainer"] == "pgd", "trainer"] = '<img src=x onerror="alert(1)">'
    source = render_index(records, summary_frame(records.results), plan_plots(records), ["results.csv"])
    assert "<img src=x" not in source and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in source
    parser = Page()
    parser.feed(source)
    assert parser.errors == [] and parser.stack == []


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH or at /usr/bin/chromium")
def test_chromium_renders_the_page(built_run, tmp_path):
    folder, _ = built_run
    screenshot = tmp_path / "page.png"
    command = [
        str(_chromium()), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
        f"--screenshot={screenshot}", (folder / "index.html").resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    image = Image.open(screenshot).convert("L")
    assert image.size == (1280, 2400)
    low, high = image.getextrema()
    assert high - low > 100  # text and plots, not a blank page
