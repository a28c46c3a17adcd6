"""The CLI's printed tables."""

from __future__ import annotations

from sidecar.cli.output import format_hits
from sidecar.retrieval.search import Hit


def test_the_text_column_starts_at_one_place_in_every_row_however_long_an_id():
    hits = [Hit(id="item-1", score=0.9, scores={"vector": 0.9}, text="short id"),
            Hit(id="2024/holidays/beach/IMG_20240712_101500.jpg", score=0.8, scores={"vector": 0.8, "bm25": 1.5},
                text="long id"),
            Hit(id="item-000002", score=0.7, scores={}, text="mid id")]
    header, *rows = format_hits(hits).splitlines()
    column = header.index("text")
    assert [row[column:] for row in rows] == ["short id", "long id", "mid id"]
    assert all(row[column - 2:column] == "  " for row in rows)


def test_a_text_of_several_lines_stays_on_its_hits_row():
    # A description of several lines (a CSV cell) printed its later lines as rows of their own, read as hits.
    hits = [Hit(id="a", score=0.9, scores={}, text="Red sneakers\nSize 42\r\n\tleather"),
            Hit(id="b", score=0.8, scores={}, text="blue")]
    header, *rows = format_hits(hits).splitlines()
    column = header.index("text")
    assert [row[column:] for row in rows] == ["Red sneakers Size 42 leather", "blue"]
