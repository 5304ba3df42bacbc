"""The report's blocks as a PDF, with matplotlib's PDF backend (no extra dependency).

A4 pages filled top to bottom: headings and wrapped paragraphs as text,
tables as fixed-width text (the font shrinks until the widest table fits the
page), images scaled to the page width keeping their aspect. A block that
does not fit on what is left of a page starts the next one.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

PAGE = (8.27, 11.69)  # A4, inches
MARGIN = 0.6
LINE = 1.45  # line height as a multiple of the font size
WRAP = 105  # characters per paragraph line at 9 pt
POINTS_PER_INCH = 72.0


class _Pages:
    def __init__(self, pdf):
        import matplotlib.pyplot as plt

        self.plt, self.pdf, self.fig, self.y = plt, pdf, None, 0.0

    def new_page(self):
        self.flush()
        self.fig = self.plt.figure(figsize=PAGE)
        self.y = PAGE[1] - MARGIN

    def need(self, height: float):
        if self.fig is None or self.y - height < MARGIN:
            self.new_page()

    def text(self, lines: list[str], size: float, **style):
        step = size * LINE / POINTS_PER_INCH
        for line in lines:
            self.need(step)
            self.fig.text(MARGIN / PAGE[0], self.y / PAGE[1], line, fontsize=size, va="top", **style)
            self.y -= step
        self.y -= step / 2

    def image(self, path: Path, caption: str):
        import matplotlib.image as mpimg

        picture = mpimg.imread(path)
        width = PAGE[0] - 2 * MARGIN
        height = min(width * picture.shape[0] / picture.shape[1], PAGE[1] - 2 * MARGIN - 0.4)
        self.need(height + 0.3)
        ax = self.fig.add_axes([MARGIN / PAGE[0], (self.y - height) / PAGE[1], width / PAGE[0], height / PAGE[1]])
        ax.imshow(picture)
        ax.axis("off")
        self.y -= height + 0.05
        self.text([caption], 8, style="italic", color="#555555")

    def flush(self):
        if self.fig is not None:
            self.pdf.savefig(self.fig)
            self.plt.close(self.fig)
            self.fig = None


MIN_TABLE_POINTS = 5.5  # below this a table is wrapped, not shrunk
MIN_COLUMN = 8  # characters a wrapped column keeps


def _table_lines(headers: list[str], rows: list[list[str]], max_chars: int) -> list[str]:
    """Fixed-width lines of a table; the widest columns wrap until a line fits ``max_chars``."""
    cells = [[str(c) for c in row] for row in (headers, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    while sum(widths) + 2 * (len(widths) - 1) > max_chars and max(widths) > MIN_COLUMN:
        widest = widths.index(max(widths))
        widths[widest] = max(MIN_COLUMN, widths[widest] - 4)

    def lines_of(row):
        wrapped = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(row, widths)]
        return ["  ".join((col[i] if i < len(col) else "").ljust(w) for col, w in zip(wrapped, widths)).rstrip()
                for i in range(max(len(col) for col in wrapped))]

    body = [line for row in cells[1:] for line in lines_of(row)]
    return [*lines_of(cells[0]), "  ".join("-" * w for w in widths), *body]


def write_pdf(blocks: list[tuple], path: Path, title: str) -> None:
    """Lay out ``blocks`` (the report's headings, paragraphs, tables and images) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    usable_points = (PAGE[0] - 2 * MARGIN) * POINTS_PER_INCH
    with PdfPages(path, metadata={"Title": title, "Creator": "featcache"}) as pdf:
        pages = _Pages(pdf)
        for block in blocks:
            kind = block[0]
            if kind == "h":
                size = {1: 16, 2: 13}.get(block[1], 11)
                pages.need(3 * size / POINTS_PER_INCH)
                pages.y -= 0.12
                pages.text([block[2]], size, weight="bold")
            elif kind == "p":
                pages.text(textwrap.wrap(block[1], WRAP), 9)
            elif kind == "table":
                # A monospaced character is about 0.6 of the font size wide.
                lines = _table_lines(block[1], block[2], int(usable_points / (0.6 * MIN_TABLE_POINTS)))
                widest = max(len(line) for line in lines)
                size = max(MIN_TABLE_POINTS, min(8.0, usable_points / (0.6 * widest)))
                pages.text(lines, size, family="monospace")
            else:
                pages.image(block[1], block[2])
        pages.flush()
