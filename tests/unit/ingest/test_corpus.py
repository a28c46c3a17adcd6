import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidecar.ingest.corpus import CorpusError, read_corpus


def test_folder_ids_are_relative_paths_and_text_comes_from_a_caption_file_or_the_name(tmp_path):
    (tmp_path / "shoes").mkdir()
    (tmp_path / "shoes" / "red_sneakers.jpg").write_bytes(b"x")
    (tmp_path / "bag.png").write_bytes(b"y")
    (tmp_path / "bag.txt").write_text("a blue leather handbag\n")
    (tmp_path / "notes.md").write_text("ignored")
    items = {item.id: item for item in read_corpus(tmp_path)}
    assert set(items) == {"shoes/red_sneakers.jpg", "bag.png"}
    assert items["shoes/red_sneakers.jpg"].text == "red sneakers"
    assert items["bag.png"].text == "a blue leather handbag"


def test_folder_scan_says_at_debug_how_many_macos_metadata_files_and_folders_it_left_out(tmp_path, caplog):
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._a.jpg").write_bytes(b"AppleDouble")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "._a.jpg").write_bytes(b"AppleDouble")
    (tmp_path / "._b.jpg").write_bytes(b"AppleDouble")
    with caplog.at_level(logging.DEBUG, logger="sidecar.ingest.corpus"):
        assert [item.id for item in read_corpus(tmp_path)] == ["a.jpg"]
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path}: macOS metadata left out of the corpus: AppleDouble files (._NAME) 2, __MACOSX/ folders 1"]


def test_jsonl_csv_and_parquet_manifests_agree(tmp_path):
    rows = [{"id": "a", "path": "img/a.jpg", "text": "red circle", "metadata": {"color": "red"}},
            {"id": "b", "path": "img/b.jpg", "text": "blue square", "metadata": {"color": "blue"}}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "m.csv").write_text("id,path,text,color\na,img/a.jpg,red circle,red\nb,img/b.jpg,blue square,blue\n")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "metadata"} | r["metadata"]
                                         for r in rows]), tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        items = list(read_corpus(tmp_path / name))
        assert [(i.id, i.text, i.metadata) for i in items] == [("a", "red circle", {"color": "red"}),
                                                                ("b", "blue square", {"color": "blue"})], name
        assert items[0].path == tmp_path / "img" / "a.jpg"


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "m.jsonl:1: not valid JSON"), ('{"id": "a"}', "m.jsonl:1: field 'path' is required"),
     ('{"path": "a.jpg", "metadata": [1]}', "field 'metadata' must be an object"),
     ('{"path": "a.jpg", "text": 5}', "field 'text' must be a string")],
)
def test_bad_manifest_lines_name_file_line_and_field(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(tmp_path / "m.jsonl"))


def test_unknown_source_kind_and_missing_source(tmp_path):
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(CorpusError, match="expected a folder, or a .jsonl, .csv or .parquet manifest"):
        read_corpus(tmp_path / "m.xml")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")



def test_parquet_errors_name_the_row_of_the_file_past_the_first_batch(tmp_path):
    rows = [{"id": str(i), "path": "" if i == 4500 else f"{i}.jpg"} for i in range(5000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with pytest.raises(CorpusError, match=r"m\.parquet row 4500: field 'path' is required"):
        list(read_corpus(tmp_path / "m.parquet"))


def test_a_folder_file_whose_name_is_not_utf8_comes_as_unusable_with_a_printable_id(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"y")
    items = {item.id: item for item in read_corpus(tmp_path)}
    assert set(items) == {"ok.jpg", "caf\\xe9.jpg"}
    assert items["caf\\xe9.jpg"].unusable == "file or folder name is not valid UTF-8: rename it"
    assert items["caf\\xe9.jpg"].path.read_bytes() == b"y"  # the real file, for errors.jsonl
    assert not items["ok.jpg"].unusable


def test_a_caption_that_is_not_utf8_makes_its_image_unusable_not_the_run(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "bad.jpg").write_bytes(b"y")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    items = {item.id: item for item in read_corpus(tmp_path)}
    assert items["bad.jpg"].unusable == "caption bad.txt is not UTF-8 text (byte 0xff at offset 0)"
    assert not items["ok.jpg"].unusable


@pytest.mark.parametrize(("name", "content", "message"), [
    ("m.jsonl", b'{"path": "a.jpg"}\n{"path": "caf\xe9.jpg"}\n', r"m\.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
    ("m.csv", b"id,path\na,a.jpg\nb,caf\xe9.jpg\n", r"m\.csv:3: not UTF-8 text \(byte 0xe9\)"),
    ("m.parquet", b"id,path\na,a.jpg\n", r"m\.parquet: cannot be read as Parquet: .*magic bytes"),
])
def test_a_manifest_that_cannot_be_decoded_is_refused_naming_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(tmp_path / name))


def test_a_csv_row_with_more_fields_than_its_header_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / "m.csv").write_text("id,path,text,color\nb,img_01.jpg,fine,blue\na,img_00.jpg,hello,red,extra\n")
    with pytest.raises(CorpusError, match=r"m\.csv:3: more fields than the header \(5, header 4\)"):
        list(read_corpus(tmp_path / "m.csv"))


def test_the_folder_scan_takes_every_name_pillow_gives_the_decoded_formats_and_the_undecoded_photo_formats(tmp_path):
    from PIL import Image

    from sidecar.config import IMAGE_FORMATS

    Image.init()
    decoded = {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS}
    refused = {".heic", ".heif", ".avif", ".ico", ".svg"}  # listed in errors.jsonl by the decoder's refusal
    for suffix in decoded | refused:
        (tmp_path / f"photo{suffix.upper() if suffix == '.jfif' else suffix}").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("not an image")
    found = {os.path.splitext(item.id)[1].lower() for item in read_corpus(tmp_path)}
    assert found == decoded | refused


def test_a_manifest_id_of_zero_is_the_id_not_replaced_by_the_path(tmp_path):
    rows = [{"id": 0, "path": "a.jpg"}, {"id": 1, "path": "b.jpg"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.parquet"):
        assert [item.id for item in read_corpus(tmp_path / name)] == ["0", "1"], name


@pytest.mark.parametrize("value", ["true", "[1]", '{"a": 1}'])
def test_a_manifest_id_that_is_no_string_or_number_is_refused_naming_the_line(tmp_path, value):
    (tmp_path / "m.jsonl").write_text(f'{{"id": {value}, "path": "a.jpg"}}\n')
    with pytest.raises(CorpusError, match=r"m.jsonl:1: field 'id' must be a string or a number"):
        list(read_corpus(tmp_path / "m.jsonl"))


def test_a_manifest_saved_with_a_utf8_byte_order_mark_keeps_its_first_column(tmp_path):
    bom = "\ufeff"
    (tmp_path / "m.csv").write_text(f"{bom}id,path,color\nx1,a.jpg,red\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(f'{bom}{{"id": "x1", "path": "a.jpg", "color": "red"}}\n', encoding="utf-8")
    for name in ("m.csv", "m.jsonl"):
        assert [(item.id, item.metadata) for item in read_corpus(tmp_path / name)] == [("x1", {"color": "red"})], name


def test_a_folder_scan_follows_a_symbolic_link_to_a_folder_and_not_one_back_to_a_folder_it_is_in(tmp_path, caplog):
    elsewhere = tmp_path / "other-disk" / "2024"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.jpg").write_bytes(b"x")
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "b.jpg").write_bytes(b"y")
    (root / "2024").symlink_to(elsewhere)
    (root / "sub" / "loop").symlink_to(root)
    (root / "x").mkdir()
    (root / "y").mkdir()
    (root / "x" / "to-y").symlink_to(root / "y")  # each into the other: a loop no single link closes
    (root / "y" / "to-x").symlink_to(root / "x")
    with caplog.at_level(logging.WARNING, logger="sidecar.ingest.corpus"):
        assert [item.id for item in read_corpus(root)] == ["2024/a.jpg", "b.jpg"]
    assert sorted(record.getMessage().split(":")[0] for record in caplog.records) == [
        f"{root}/sub/loop", f"{root}/x/to-y/to-x", f"{root}/y/to-x/to-y"]
    assert caplog.records[0].getMessage().endswith("a folder it is in: not followed (its images would be listed "
                                                   "again and again)")


@pytest.mark.parametrize(
    ("content", "message"),
    [('id,path,text\na,a.jpg,one\nb,b.jpg,"never closed\nc,c.jpg,three\nd,d.jpg,four\n',
      r"m.csv:3: not valid CSV \(unexpected end of data\)"),
     ("id,path,text\na,a.jpg,\"two\nlines\"\nb,b.jpg," + "x" * 200_000 + "\n",
      r"m.csv:4: not valid CSV \(field larger than field limit \(131072\)\)"),
     ('id,path,"text\n', r"m.csv:1: not valid CSV \(unexpected end of data\)")],
)
def test_a_csv_that_csv_cannot_parse_is_refused_naming_the_line_its_row_starts_on(tmp_path, content, message):
    # A quote never closed made every later line part of its cell: those rows read as deleted, without a word.
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(tmp_path / "m.csv"))


def test_a_csv_row_after_a_cell_of_several_lines_is_named_by_the_line_it_starts_on(tmp_path):
    (tmp_path / "m.csv").write_text('id,path,text\na,a.jpg,"two\nlines"\nb,,three\n')
    with pytest.raises(CorpusError, match="m.csv:4: field 'path' is required"):
        list(read_corpus(tmp_path / "m.csv"))
