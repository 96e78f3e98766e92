"""Great Expectations Data Docs that read offline.

GE's pages load Bootstrap, Font Awesome, jQuery and bootstrap-table from CDNs: offline they render
unstyled, their status icons are blank and the index lists nothing (its tables are filled by
JavaScript). :func:`make_offline` rewrites the site GE wrote: the CDN tags and the scripts that need
them go, a small local stylesheet (``static/styles/offline.css``) styles the tables and draws the
status icons, and the index's two tables (validation results, expectation suites) are written out as
plain HTML with links to the pages that exist.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

OFFLINE_CSS = """/* written by flip.data.datadocs: Data Docs without CDNs */
body { font-family: sans-serif; color: #222; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.8em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
a { color: #0645ad; }
.text-success, .ge-success-icon { color: #1a7f37; }
.text-danger, .ge-failed-icon { color: #c62828; }
.text-warning { color: #9a6700; }
.fas, .far, .fa { font-style: normal; }
.fa-check-circle::before, .fa-check::before { content: "\\2714"; }
.fa-times::before, .fa-times-circle::before { content: "\\2718"; }
.fa-question-circle::before { content: "?"; }
.fa-exclamation-triangle::before { content: "\\26A0"; }
.badge { border: 1px solid #999; border-radius: 3px; padding: 0 4px; margin: 0 2px; font-size: 0.85em; }
.nav, .navbar, .btn, .ge-index-page-table-toolbar, [id$="-table-toolbar"] { display: none; }
.tab-pane { display: block; margin-bottom: 2em; }
.card { border: 1px solid #ddd; margin: 0.8em 0; padding: 0.5em 1em; }
"""

CDN_LINK = re.compile(r'<link[^>]+href="https?://[^"]*"[^>]*>\s*', re.I)
CDN_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>\s*', re.I)
INLINE_SCRIPT = re.compile(r"<script>.*?</script>\s*", re.S | re.I)  # they drive the libraries removed above
REMOTE_LOGO = re.compile(r'src="https?://[^"]*/logo-long\.png[^"]*"')  # GE's logo, also in its static/images
EMPTY_TABLE = re.compile(r'<table\s+id="[^"]*"\s+class="[^"]*ge-index-page-(validation-results|expectation_suites)'
                         r'-table"[^>]*>\s*</table>', re.S)


def _validation_rows(docs: Path, status: dict[str, str]) -> str:
    rows = []
    for page in sorted(docs.glob("validations/**/*.html")):
        parts = page.relative_to(docs).parts  # validations/<suite>/<run name>/<run time>/<asset>.html
        suite, run_time = parts[1], parts[-2]
        icon = {"passed": '<i class="fas fa-check-circle text-success"></i> passed',
                "failed": '<i class="fas fa-times text-danger"></i> failed',
                "warning": '<i class="fas fa-exclamation-triangle text-warning"></i> warning'}.get(status.get(suite), "")
        href = html.escape(page.relative_to(docs).as_posix())
        rows.append(f'<tr><td>{icon}</td><td>{html.escape(run_time)}</td><td><a href="{href}">'
                    f"{html.escape(suite)}</a></td><td>{html.escape(page.stem)}</td></tr>")
    return ('<table class="ge-offline-validations"><tr><th>status</th><th>run time</th><th>expectation suite</th>'
            "<th>batch</th></tr>" + "".join(rows) + "</table>")


def _suite_rows(docs: Path) -> str:
    rows = [f'<tr><td><a href="{html.escape(p.relative_to(docs).as_posix())}">{html.escape(p.stem)}</a></td></tr>'
            for p in sorted(docs.glob("expectations/**/*.html"))]
    return '<table class="ge-offline-suites"><tr><th>expectation suite</th></tr>' + "".join(rows) + "</table>"


def make_offline(docs: Path, status: dict[str, str]) -> int:
    """Rewrite every page under ``docs`` to need nothing from the network; ``status`` maps each
    expectation suite to passed, failed or warning (for the index). Returns the pages rewritten."""
    docs = Path(docs)
    css = docs / "static" / "styles" / "offline.css"
    css.parent.mkdir(parents=True, exist_ok=True)
    css.write_text(OFFLINE_CSS, encoding="utf-8")
    pages = sorted(docs.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        text = INLINE_SCRIPT.sub("", CDN_SCRIPT.sub("", CDN_LINK.sub("", text)))
        text = REMOTE_LOGO.sub(f'src="{os.path.relpath(docs / "static" / "images" / "logo-long.png", page.parent)}"', text)
        link = f'<link rel="stylesheet" href="{os.path.relpath(css, page.parent)}">\n'
        text = text.replace("</head>", link + "</head>", 1)
        if page == docs / "index.html":
            text = EMPTY_TABLE.sub(lambda m: _validation_rows(docs, status) if m.group(1) == "validation-results"
                                   else _suite_rows(docs), text)
        page.write_text(text, encoding="utf-8")
    return len(pages)
