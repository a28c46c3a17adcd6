"""The benchmark catalogue: titles carry what pixels cannot, queries of three kinds, graded judgments."""

from __future__ import annotations

import json

from PIL import Image

from sidecar.model import catalogue, synthetic


def test_products_are_the_same_whatever_n_and_codes_are_unique():
    few = list(catalogue.iter_products(5, seed=3))
    many = list(catalogue.iter_products(400, seed=3))
    assert [(p.id, p.title, p.attributes) for p in few] == [(p.id, p.title, p.attributes) for p in many[:5]]
    assert few[2].image.tobytes() == many[2].image.tobytes()
    assert len({p.attributes["code"] for p in many}) == 400


def test_titles_carry_brand_material_and_code_and_never_the_position():
    for product in catalogue.iter_products(300, seed=0):
        title = product.title.split()
        attrs = product.attributes
        assert attrs["material"] in title and attrs["code"] in title
        assert not {phrase.split()[-1] for phrase in synthetic._POSITION_PHRASES[attrs["position"]]} & set(title)
    titles = [p.title for p in catalogue.iter_products(300, seed=0)]
    # The shape is named in most titles, the colour in a minority: the picture says what the title omits.
    named_shape = sum(any(s in t.split() for s in synthetic.SHAPES) for t in titles) / len(titles)
    named_colour = sum(any(c in t.split() for c in synthetic.COLORS) for t in titles) / len(titles)
    assert 0.55 < named_shape < 0.85 and 0.2 < named_colour < 0.5


def test_grades_follow_the_attributes_a_query_names():
    product = {"shape": "star", "color": "red", "size": "large", "position": "left", "brand": "Acme"}
    assert catalogue.grade({"shape": "star", "color": "red", "brand": "Acme"}, product) == 2
    assert catalogue.grade({"shape": "star", "color": "blue", "brand": "Acme"}, product) == 1
    assert catalogue.grade({"shape": "star", "color": "blue", "brand": "Corvid"}, product) == 0
    assert catalogue.grade({"shape": "star", "color": "blue"}, product) == 0  # two named: no partial credit


def test_queries_come_in_three_kinds_each_with_a_fully_relevant_product():
    products = list(catalogue.iter_products(800, seed=0))
    queries = catalogue.make_queries(products, per_category=20, seed=0)
    assert [q.category for q in queries].count("mixed") == 20 and len({q.text for q in queries}) == 60
    qrels = catalogue.judgments(queries, products)
    for query in queries:
        assert 2 in qrels[query.id].values(), query
        named = set(query.named)
        if query.category == "text-heavy":
            assert named in ({"code"}, {"brand", "material", "shape"})
        elif query.category == "image-heavy":
            assert named <= set(synthetic.ATTRIBUTES) and len(named) >= 3
        else:
            assert named & {"brand", "material"} and {"color", "shape"} <= named
    # Out-of-distribution queries name a (colour, shape) pair no tiny model trained on, and say so.
    ood = [q for q in queries if q.out_of_distribution]
    assert ood and all(synthetic.is_held_out(q.named) and q.category != "text-heavy" for q in ood)
    assert all(q.to_json()["tags"] == ["out-of-distribution"] for q in ood)


def test_write_catalogue_writes_a_corpus_queries_and_trec_qrels(tmp_path):
    files = catalogue.write_catalogue(tmp_path, 200, queries_per_category=5, seed=1)
    rows = [json.loads(line) for line in files.manifest.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200 and set(rows[0]["metadata"]) == {*synthetic.ATTRIBUTES, "brand", "material", "code"}
    with Image.open(files.manifest.parent / rows[0]["path"]) as image:
        assert image.format == "JPEG"
    queries = [json.loads(line) for line in files.queries.read_text(encoding="utf-8").splitlines()]
    assert len(queries) == 15 and {"id", "text", "category", "tags"} <= set(queries[0])
    judged = {line.split()[0] for line in files.qrels.read_text(encoding="utf-8").splitlines()}
    assert judged == {q["id"] for q in queries}

