"""The fine-ranking stage: a stronger model's scores for the coarse candidates, fused with lexical evidence.

The coarse stage recalls N candidates with the fast model (ANN or exact, BM25, or both); this
stage scores just those N with a stronger model — its image vectors were computed in the same
`embed` pass and stored beside each document, outside the ANN index; its text vector is computed
for the query — and, where the query has lexical evidence (modes bm25 and hybrid), fuses the two
over the candidate set. One function, so `/v1/search`, the evaluation harness and the rerank
endpoint OpenSearch calls all rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from sidecar.retrieval.fusion import fuse
from sidecar.types import Document, ModelSignature


@dataclass(frozen=True, slots=True)
class FineScores:
    fine: dict[str, float]  # the strong model's cosine per candidate
    final: dict[str, float]  # what the stage ranks by: `fine`, or `fine` fused with the lexical scores


class UnusableFineVectors(ValueError):
    """Candidates whose stored fine vectors the stage cannot use: none (indexed without a fine model),
    or of another fine model than the one that encoded the query (another size, or another model the
    store records). The stage is skipped, saying why."""


def fine_size_mismatch(size: int, *, model_size: int, whose: str) -> str | None:
    """Why fine vectors of `size` dimensions are unusable by a fine model of `model_size` (they came from
    another fine model), or None where the sizes agree; `whose` names them ("the candidates' fine vectors have")."""
    if size == model_size:
        return None
    return (f"{whose} {size} dimensions, this server's fine model gives {model_size}: embedded with another fine "
            "model; serve that one, or embed with --fine-model set to this one and index again")


def fine_rank(query: np.ndarray, candidates: Sequence[Document], *, lexical: Mapping[str, float] | None = None,
              fusion: str = "minmax", weights: tuple[float, float] = (0.5, 0.5), model: ModelSignature | None = None,
              stored_model: ModelSignature | None = None) -> FineScores:
    """Score `candidates` with the strong model (`query` is its unit vector for the query), then fuse
    with `lexical` (raw BM25 of the candidates; those without a match contribute 0) by `fusion` and
    `weights` (strong model, BM25). With no lexical evidence the strong model's scores decide alone.
    `model` encoded `query`; `stored_model` is the fine model the store records for the candidates'
    vectors: another one is refused. Where either is None (the candidates were encoded for this
    call; a store that records none), only the vectors' size is checked."""
    if not candidates:
        return FineScores(fine={}, final={})
    missing = [doc.id for doc in candidates if doc.fine_vector is None]
    if missing:
        raise UnusableFineVectors(f"{len(missing)} of {len(candidates)} candidates (e.g. {missing[0]}) have no "
                                 "fine-model vector: embed them with --fine-model and index again")
    matrix = np.stack([np.asarray(doc.fine_vector, dtype=np.float32) for doc in candidates])
    mismatch = fine_size_mismatch(matrix.shape[1], model_size=query.shape[-1], whose="the candidates' fine vectors have")
    if mismatch:
        raise UnusableFineVectors(mismatch)
    if model is not None and stored_model is not None and stored_model != model:
        # Same size, another model: the scores would look like any others, and rank by noise.
        raise UnusableFineVectors(f"the candidates' fine vectors were embedded with {stored_model.describe()}, this "
                                  f"server's fine model is {model.describe()}: serve that one, or embed them with "
                                  "--fine-model set to this one and index them into a new store")
    fine = dict(zip((doc.id for doc in candidates), (matrix @ np.asarray(query, dtype=np.float32)).tolist()))
    evidence = {doc_id: score for doc_id, score in (lexical or {}).items() if doc_id in fine}
    if not evidence:
        return FineScores(fine=fine, final=fine)
    return FineScores(fine=fine, final=fuse([fine, evidence], method=fusion, weights=weights))
