"""Packed edge probes: one ciphertext at the edge, the columns again at the cloud."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric
from cipherface.exceptions import (
    CiphertextError,
    ConfigError,
    KeyMismatchError,
    SecretKeyError,
    WireFormatError,
)
from cipherface.gallery import EncryptedGallery, EnrollmentBook, encrypt_probe, rank
from cipherface.gallery.expansion import (
    edge_keys,
    encrypt_packed_probe,
    expand_probe,
    expansion_elements,
    pack_weights,
)
from cipherface.gallery.integrity import galois_keys, prove_probe
from cipherface.gallery.packing import _SCORE_SCALE, _Seal
from cipherface.wire.payloads import EncryptedProbe

#: Largest error seen on an expanded column (4.7e-4 at 128-d, 5.0e-4 at 512-d),
#: about a fresh column's (4.1e-4), with room.
COLUMN_ERROR = 8e-4


@pytest.fixture(scope="module")
def galois(keys: Keyring) -> bytes:
    return edge_keys(keys, 128)


def _unit(dimensions: int, seed: int = 3) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize(
    ("dimensions", "metric", "factor"),
    [(128, Metric.EUCLIDEAN_L2, -2.0), (512, Metric.COSINE, -1.0), (100, Metric.EUCLIDEAN, -2.0)],
)
def test_expanded_columns_hold_each_weight_in_every_slot(
    keys: Keyring, public: Keyring, dimensions: int, metric: Metric, factor: float
) -> None:
    vector = _unit(dimensions) * (2.0 if metric is Metric.EUCLIDEAN else 1.0)
    packed = encrypt_packed_probe(public, vector, metric)
    assert packed.columns == () and packed.packed is not None
    assert len(packed.packed) < 300_000  # one ciphertext, whatever the dimensions
    expanded = expand_probe(public, edge_keys(keys, dimensions), packed)
    assert expanded.packed is None and len(expanded.columns) == dimensions
    assert expanded.norm == packed.norm
    seal = _Seal(keys)
    for j, column in enumerate(expanded.columns):
        ciphertext = seal.load(column)  # the gallery's level: `load` refuses any other
        assert ciphertext.scale == np.sqrt(_SCORE_SCALE)
        slots = seal.decrypt_slots(ciphertext)
        assert np.abs(slots - factor * vector[j]).max() < COLUMN_ERROR


def test_a_packed_probe_ranks_as_the_columns_do(
    keys: Keyring, public: Keyring, galois: bytes
) -> None:
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((500, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    book = EnrollmentBook(keys, Metric.COSINE, 128)
    book.add_many((f"s{i}", v, f"t{i}") for i, v in enumerate(vectors))
    probe = vectors[42] + 0.1 * _unit(128)
    with EncryptedGallery(public) as gallery:
        for block in book.encrypt_blocks():
            gallery.put(block)
        ranked = {}
        for name, edge in (
            ("columns", encrypt_probe(public, probe, Metric.COSINE)),
            ("packed", encrypt_packed_probe(public, probe, Metric.COSINE)),
        ):
            expanded = expand_probe(public, galois, edge)
            check = prove_probe(public, galois, expanded)
            matches = rank(keys, book, gallery.search(expanded), top_k=3, probe_check=check)
            ranked[name] = [m.template_id for m in matches]
        with pytest.raises(ConfigError, match="once expanded"):
            gallery.search(encrypt_packed_probe(public, probe, Metric.COSINE))
    assert ranked["packed"][0] == "t42"
    assert ranked["packed"] == ranked["columns"]


def test_a_column_probe_is_left_as_it_is(public: Keyring, galois: bytes) -> None:
    columns = encrypt_probe(public, _unit(4), Metric.COSINE)
    assert expand_probe(public, galois, columns) is columns


# -- what the cloud refuses to expand -----------------------------------------------


def _packed(public: Keyring, data: bytes) -> EncryptedProbe:
    return EncryptedProbe(
        fingerprint=public.fingerprint,
        metric=Metric.COSINE.value,
        dimensions=128,
        columns=(),
        norm=None,
        packed=data,
    )


def test_forged_packed_ciphertexts_are_refused(public: Keyring, galois: bytes) -> None:
    seal = _Seal(public)
    honest = encrypt_packed_probe(public, _unit(128), Metric.COSINE).packed
    assert honest is not None
    rescaled = seal.load_into(sealapi.Ciphertext(), honest)
    rescaled.scale = 2.0**40
    product = seal.load_into(sealapi.Ciphertext(), honest)
    scale = product.scale
    product.scale = 1.0
    seal.evaluator.square_inplace(product)  # three components
    product.scale = scale
    forged = {
        "at the gallery's level": seal.encrypt_public(0.5, np.sqrt(_SCORE_SCALE)),
        "at another scale": seal.dump(rescaled),
        "of three components": seal.dump(product),
    }
    for data in forged.values():
        with pytest.raises(CiphertextError, match="one level above"):
            expand_probe(public, galois, _packed(public, data))
    with pytest.raises(CiphertextError):
        expand_probe(public, galois, _packed(public, b"\x00" * 1000))


def test_without_the_expansion_keys_a_packed_probe_is_refused(
    public: Keyring, conjugation: bytes
) -> None:
    probe = encrypt_packed_probe(public, _unit(128), Metric.COSINE)
    with pytest.raises(ConfigError, match="expansion keys"):
        expand_probe(public, conjugation, probe)


def test_a_packed_probe_under_another_key_is_refused(public: Keyring, galois: bytes) -> None:
    other = Keyring.generate("n8192", relin_keys=False).public()
    with pytest.raises(KeyMismatchError):
        expand_probe(public, galois, encrypt_packed_probe(other, _unit(128), Metric.COSINE))


def test_the_keys_are_loaded_once_per_key_set(public: Keyring, galois: bytes) -> None:
    assert galois_keys(public, galois) is galois_keys(public, galois)


def test_keys_need_the_secret_and_a_probe_fits_one_ring(keys: Keyring, public: Keyring) -> None:
    with pytest.raises(SecretKeyError):
        edge_keys(public, 128)
    assert expansion_elements(keys, 128) == [8193, 4097, 2049, 1025, 513, 257, 129]
    with pytest.raises(ConfigError):
        expansion_elements(keys, 8193)


def test_packed_probes_on_the_wire() -> None:
    base = {
        "fingerprint": "f",
        "metric": "cosine",
        "dimensions": 128,
        "columns": [],
        "norm": None,
        "packed": b"p",
    }
    assert EncryptedProbe.from_dict(base).packed == b"p"
    with pytest.raises(WireFormatError, match="no columns"):
        EncryptedProbe.from_dict({**base, "columns": [b"c"] * 128})
    with pytest.raises(WireFormatError, match="one ciphertext per dimension"):
        EncryptedProbe.from_dict({**base, "packed": None})
    with pytest.raises(WireFormatError):
        EncryptedProbe.from_dict({**base, "packed": "text"})
    older = {**base, "columns": [b"c"] * 128}
    del older["packed"]
    assert EncryptedProbe.from_dict(older).packed is None  # from an edge before packing


def test_pack_weights_places_coefficients_the_expansion_finds(
    keys: Keyring, public: Keyring, galois: bytes
) -> None:
    """A forger may fill coefficients beyond the dimensions: they surface in the
    columns as slot-to-slot variation, which on-prem's per-slot checks see."""
    seal = _Seal(public)
    coefficients = np.zeros(256)
    coefficients[5] = 0.5 / 128
    coefficients[128 + 5] = 0.25 / 128  # folds onto column 5 as 0.25 X^128
    expanded = expand_probe(public, galois, _packed(public, pack_weights(seal, coefficients)))
    slots = _Seal(keys).decrypt_slots(_Seal(keys).load(expanded.columns[5]))
    assert np.ptp(slots.real) > 0.4  # 0.5 +- 0.25: no longer one weight in every slot
    assert np.abs(_Seal(keys).decrypt_slots(_Seal(keys).load(expanded.columns[4]))).max() < 1e-3
