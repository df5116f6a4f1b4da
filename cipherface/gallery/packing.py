"""Packing math: how templates sit in CKKS slots, and the SEAL plumbing that encrypts them.

Layout
------
A ciphertext has ``S = N/2`` complex slots (4096 at N=8192), and each slot holds
*two* templates' values: templates are grouped in *blocks* of up to ``2S``, and
the template at position ``k`` of a block lives in slot ``k % S``, in the real
part if ``k < S`` and in the imaginary part otherwise (so decryption is the real
parts followed by the imaginary parts). Block ``b`` of a ``d``-dimensional gallery
is ``d`` ciphertexts, *columns*: column ``j`` holds component ``j`` of every
template of the block. The inner products of one probe ``p`` with all ``2S``
templates are then ``sum_j w_j * C_j``: with a *real* weight,
``w (a + ib) = wa + i wb`` keeps the two templates of a slot apart. That is ``d``
scalar products and additions, with no rotation, so the cloud needs no Galois
keys (and, since nothing is relinearised, no relinearisation keys either)::

    score = [||g||^2] + sum_j w_j * C_j + c(1 + i)
    euclidean     w = -2p,  c = ||p||^2,  plus an encrypted ||g||^2 column
    euclidean_l2  w = -2p,  c = 2         (unit vectors: ||g|| = ||p|| = 1)
    cosine        w = -p,   c = 1

Constants are added as ``c + ic`` so that both parts receive them; the edge's
encrypted ``||p||^2`` is encrypted that way too.

Measured on the 2-core benchmark machine (N=8192, 128-d):

- Columns live at the *lowest* modulus level (one 60-bit prime). Gallery values
  are encoded at scale 2^25 and probe weights at 2^25, so the product sits at
  2^50 with 9 bits of headroom: no rescaling is ever needed, and the ciphertext
  is a third of a fresh one (131 KB instead of 235 KB in memory).
- On-prem encrypts columns *symmetrically* with the secret key, and ships them
  seeded (SEAL stores the 64-byte PRNG seed instead of the uniform half): 65.7 KB
  per column instead of 131 KB; with two templates per slot that is about
  1.03 KB per 128-d template (1.04 KB with the euclidean norm column) against
  230 KB seed-style (one ciphertext per template).
- Precision, the same in both parts of a slot: plaintext probes decrypt within
  ~5e-5 of numpy on scores of order 1 (1e-4 on raw euclidean distances near 10)
  before their scores are compressed for the wire, within ~4.3e-4 after
  (`cipherface.gallery.compact`); encrypted probes within ~4e-4 (9e-4), from
  public-key encryption noise at scale 2^25. Scores must stay below 2^9 in
  magnitude, which limits euclidean embeddings to ``||x||^2 <= MAX_SQUARED_NORM``.

Every other gallery module builds on this one; it knows nothing of books,
shards or ranking.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi

from cipherface.crypto import Keyring, Metric, prepare_embedding
from cipherface.exceptions import CiphertextError, ConfigError, IntegrityError, SecretKeyError
from cipherface.wire.payloads import EncryptedProbe

__all__ = ["MAX_SQUARED_NORM", "encrypt_probe"]

#: Gallery values and probe weights are both encoded at 2^25: the product lands at
#: 2^50 under the 60-bit lowest prime, leaving 9 bits for the score itself.
_SCALE_BITS = 25
_VALUE_SCALE = 2.0**_SCALE_BITS
_SCORE_SCALE = 2.0 ** (2 * _SCALE_BITS)
#: Euclidean embeddings above this squared norm could push a squared distance
#: (at most 4x this) past the 2^9 headroom, where CKKS wraps around silently.
MAX_SQUARED_NORM = 120.0
#: A real weight multiplies both templates of a slot, but a constant added to the
#: scores must be c + ic to reach the imaginary part's template as well.
_BOTH_PARTS = 1 + 1j


def _scratch_dir() -> str | None:
    # TenSEAL's raw SEAL bindings serialize only through files; tmpfs keeps that
    # a memory copy.
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class _Seal:
    """Raw SEAL objects for one keyring: encoder, evaluator, encryptors, (de)serialization."""

    def __init__(self, keyring: Keyring) -> None:
        self.fingerprint = keyring.fingerprint
        self.context = keyring.context.seal_context().data
        self.level = self.context.last_parms_id()
        if self.context.last_context_data().total_coeff_modulus_bit_count() < 2 * _SCALE_BITS + 10:
            raise ConfigError("the lowest CKKS prime must have at least 60 bits for the gallery")
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.slots = int(self.encoder.slot_count())
        #: Templates per block: one in the real and one in the imaginary part of each slot.
        self.capacity = 2 * self.slots
        self.public = sealapi.Encryptor(self.context, keyring.context.public_key().data)
        self.secret: Any = None
        self.decryptor: Any = None
        if keyring.is_private:
            secret_key = keyring.context.secret_key().data
            self.secret = sealapi.Encryptor(self.context, secret_key)
            self.decryptor = sealapi.Decryptor(self.context, secret_key)
        self._lock = threading.Lock()
        fd, self._path = tempfile.mkstemp(prefix="cipherface-", suffix=".seal", dir=_scratch_dir())
        os.close(fd)
        weakref.finalize(self, _unlink, self._path)

    def plain(
        self, value: float | complex | Sequence[float] | Sequence[complex], scale: float
    ) -> Any:
        plain = sealapi.Plaintext()
        self.encoder.encode(value, self.level, scale, plain)
        return plain

    def dump(self, obj: Any) -> bytes:
        with self._lock:
            obj.save(self._path)
            return Path(self._path).read_bytes()

    def load_into(self, target: Any, data: bytes) -> Any:
        """Deserialize SEAL object ``target`` (a ciphertext, Galois keys) from ``data``."""
        with self._lock:
            Path(self._path).write_bytes(data)
            try:
                target.load(self.context, self._path)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CiphertextError("bytes are not a SEAL object under this context") from exc
        return target

    def load(self, data: bytes) -> Any:
        ciphertext = self.load_into(sealapi.Ciphertext(), data)
        if ciphertext.parms_id() != self.level:
            raise CiphertextError("gallery ciphertexts must be at the lowest modulus level")
        return ciphertext

    def load_checked(self, data: bytes, *, size: int, scale: float = _SCORE_SCALE) -> Any:
        """A ciphertext the protocol made, or `IntegrityError`: checked *before* decryption.

        Scores and edge-probe norms are products of two ``2^25``-scale factors at the
        lowest level, in NTT form; ``size`` is 2 for ciphertext x plaintext and 3 for
        an unrelinearised ciphertext x ciphertext. Any other ciphertext (scale 1, an
        extra component) would make decryption a chosen-ciphertext oracle.
        """
        try:
            ciphertext = self.load(data)
        except CiphertextError as exc:
            raise IntegrityError(f"not a score ciphertext of this gallery: {exc}") from exc
        if not ciphertext.is_ntt_form() or ciphertext.size() != size:
            raise IntegrityError(
                f"a ciphertext of {ciphertext.size()} components where the protocol makes {size}"
            )
        if ciphertext.scale != scale:
            raise IntegrityError(f"a ciphertext at scale {ciphertext.scale:g}, not {scale:g}")
        return ciphertext

    def pack(self, values: np.ndarray) -> list[complex]:
        """Template-ordered values (at most `capacity`) as complex slots.

        Template ``k`` goes to slot ``k % slots``: the real part for ``k < slots``,
        the imaginary part otherwise, so `unpack` is a concatenation.
        """
        packed = np.zeros(self.slots, dtype=np.complex128)
        packed.real[: min(values.size, self.slots)] = values[: self.slots]
        packed.imag[: max(values.size - self.slots, 0)] = values[self.slots :]
        return packed.tolist()

    def unpack(self, plain: Any) -> np.ndarray:
        """Inverse of `pack`: all `capacity` values of a decrypted plaintext, in template order."""
        packed = np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)
        return np.concatenate([packed.real, packed.imag])

    def encrypt_seeded(self, values: np.ndarray, scale: float) -> bytes:
        """Symmetric encryption of `pack`ed ``values``, the seed serialized for the random half."""
        if self.secret is None:
            raise SecretKeyError("gallery blocks are encrypted on-prem, with the secret key")
        return self.dump(self.secret.encrypt_symmetric(self.plain(self.pack(values), scale)))

    def encrypt_public(self, value: float | complex, scale: float) -> bytes:
        ciphertext = sealapi.Ciphertext()
        self.public.encrypt(self.plain(value, scale), ciphertext)
        return self.dump(ciphertext)

    def decrypt_slots(self, ciphertext: Any) -> np.ndarray:
        """The complex slots of a ciphertext `load_checked` accepted."""
        if self.decryptor is None:
            raise SecretKeyError("only on-prem, holding the secret key, can decrypt scores")
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)

    def decrypt(self, ciphertext: Any) -> np.ndarray:
        """All `capacity` template-ordered values of a ciphertext `load_checked` accepted."""
        packed = self.decrypt_slots(ciphertext)
        return np.concatenate([packed.real, packed.imag])


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _encrypt_columns(
    seal: _Seal, matrix: np.ndarray, metric: Metric
) -> tuple[tuple[bytes, ...], bytes | None]:
    """Columns (and the euclidean norm column) of one block; ``matrix`` is templates x d."""
    columns = tuple(seal.encrypt_seeded(matrix[:, j], _VALUE_SCALE) for j in range(matrix.shape[1]))
    norms = None
    if metric is Metric.EUCLIDEAN:
        norms = seal.encrypt_seeded(np.einsum("ij,ij->i", matrix, matrix), _SCORE_SCALE)
    return columns, norms


def _check_norm(vector: np.ndarray, metric: Metric) -> None:
    if metric is Metric.EUCLIDEAN and float(vector @ vector) > MAX_SQUARED_NORM:
        raise ConfigError(
            f"euclidean embeddings must have squared norm <= {MAX_SQUARED_NORM} to stay in the "
            "encrypted range; use euclidean_l2 or cosine for unnormalised models"
        )


def _weights(metric: Metric) -> tuple[float, float]:
    """(factor on the probe, constant added): see the module docstring's table."""
    if metric is Metric.COSINE:
        return -1.0, 1.0
    if metric is Metric.EUCLIDEAN_L2:
        return -2.0, 2.0
    return -2.0, 0.0


def encrypt_probe(keyring: Keyring, embedding: np.ndarray, metric: Metric) -> EncryptedProbe:
    """Encrypt a probe at the edge (public context suffices) for any gallery of ``metric``.

    In columns: about 0.13 MB per dimension (16.8 MB at 128-d), the price of
    needing no Galois keys at the cloud beyond conjugation; one ciphertext for the
    whole probe is `cipherface.gallery.expansion.encrypt_packed_probe`.
    """
    seal, weights, norm = _edge_weights(keyring, embedding, metric)
    return EncryptedProbe(
        fingerprint=keyring.fingerprint,
        metric=metric.value,
        dimensions=int(weights.size),
        columns=tuple(seal.encrypt_public(float(w), _VALUE_SCALE) for w in weights),
        norm=norm,
    )


def _edge_weights(
    keyring: Keyring, embedding: np.ndarray, metric: Metric
) -> tuple[_Seal, np.ndarray, bytes | None]:
    """What an edge probe encrypts in either layout: the weights ``w p`` and, for the
    euclidean metric, ``||p||^2`` already encrypted (both parts of every slot)."""
    seal = _Seal(keyring)
    vector = prepare_embedding(embedding, metric)
    _check_norm(vector, metric)
    factor, _ = _weights(metric)
    norm = None
    if metric is Metric.EUCLIDEAN:
        norm = seal.encrypt_public(float(vector @ vector) * _BOTH_PARTS, _SCORE_SCALE)
    return seal, factor * vector, norm
