"""CKKS keys and encrypted distances (cipherface.crypto) on the real TenSEAL."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from deepface.modules.verification import find_distance

from cipherface import CipherFace
from cipherface.crypto import (
    HE_STANDARD_MAX_MODULUS_BITS,
    PRESETS,
    EncryptedVector,
    Keyring,
    Metric,
    Preset,
    decision,
    encrypted_distance,
    plain_distance,
)
from cipherface.exceptions import (
    CiphertextError,
    ConfigError,
    CryptoError,
    KeyMismatchError,
    SecretKeyError,
)

#: Allowed |decrypted - numpy| per unit of input magnitude (1 + |a|^2 + |b|^2): CKKS error
#: grows with the size of the values multiplied, not with the distance. The n8192 preset
#: encodes at scale 2^40 and its worst error measured over these cases was ~1e-6 of that
#: magnitude; n16384 encodes at 2^50 and stays near 1e-9. Each bound leaves a 10x margin
#: and is still far below any decision threshold (Dlib cosine: 0.07).
TOLERANCE = {"n8192": 1e-5, "n16384": 1e-8}

DIMENSIONS = (128, 512, 4096)  # Dlib/Facenet/SFace, Facenet512/ArcFace, VGG-Face


@pytest.fixture(scope="module", params=sorted(PRESETS))
def keyring(request: pytest.FixtureRequest) -> Keyring:
    """A private keyring with Galois keys, one per preset."""
    return Keyring.generate(request.param, galois_keys=True)


@pytest.fixture(scope="module")
def small_keyring() -> Keyring:
    """The default preset, for tests that need any working keys."""
    return Keyring.generate(galois_keys=True)


def numpy_distance(a: np.ndarray, b: np.ndarray, metric: Metric) -> float:
    """What the decryption must give, from first principles (squared for euclidean metrics)."""
    if metric is Metric.COSINE:
        return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    if metric is Metric.EUCLIDEAN_L2:
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(np.sum((a - b) ** 2))


def embedding_pair(dimensions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two nearby embeddings with Facenet-like spread (entries up to a few units)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.5, dimensions)
    return a, a + rng.normal(0.0, 0.5, dimensions)


def plain_prepared(vector: np.ndarray, metric: Metric) -> np.ndarray:
    """The encrypted form: unit length for the metrics that normalise."""
    return vector / np.linalg.norm(vector) if metric.normalises else vector


@pytest.mark.parametrize("against", ["ciphertext", "plaintext"])
@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("dimensions", DIMENSIONS)
def test_decrypted_distance_equals_numpy(
    keyring: Keyring, dimensions: int, metric: Metric, against: str
) -> None:
    a, b = embedding_pair(dimensions, seed=dimensions)
    alpha = keyring.encrypt(plain_prepared(a, metric))
    beta = keyring.encrypt(plain_prepared(b, metric)) if against == "ciphertext" else b

    got = keyring.decrypt(encrypted_distance(keyring, alpha, beta, metric))[0]

    expected = numpy_distance(a, b, metric)
    magnitude = 1.0 + float(a @ a + b @ b) if metric is Metric.EUCLIDEAN else 3.0
    preset = next(n for n, p in PRESETS.items() if p.slots == keyring.slots)
    assert abs(got - expected) <= TOLERANCE[preset] * magnitude
    assert plain_distance(a, b, metric) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("metric", list(Metric))
def test_plain_distance_is_deepface_distance(metric: Metric) -> None:
    a, b = embedding_pair(128, seed=7)
    ours = plain_distance(a, b, metric)
    # DeepFace rounds its distances to 6 decimals; ours are squared for euclidean metrics.
    unsquared = float(np.sqrt(ours)) if metric.squared else ours
    assert unsquared == pytest.approx(float(find_distance(a, b, metric.value)), abs=5e-7)


@pytest.mark.parametrize("metric", list(Metric))
def test_decision_squares_euclidean_thresholds(metric: Metric) -> None:
    limit = 0.36 if metric.squared else 0.6
    assert decision(limit - 1e-9, 0.6, metric)
    assert decision(limit, 0.6, metric)
    assert not decision(limit + 1e-9, 0.6, metric)


# -- presets -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_respect_the_he_standard(name: str) -> None:
    preset = PRESETS[name]
    # Bounds from the HomomorphicEncryption.org standard (Table 1, ternary secrets).
    standard = {(128, 8192): 218, (128, 16384): 438, (256, 8192): 118, (256, 16384): 237}
    limit = standard[preset.security_bits, preset.poly_modulus_degree]
    assert HE_STANDARD_MAX_MODULUS_BITS[preset.security_bits][preset.poly_modulus_degree] == limit
    assert sum(preset.coeff_mod_bit_sizes) <= limit
    assert preset.slots == preset.poly_modulus_degree // 2


def test_preset_beyond_the_standard_is_refused() -> None:
    with pytest.raises(ConfigError, match="exceed the 218-bit limit"):
        Preset(
            name="too-big",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40, 40, 60),
            scale_bits=40,
            security_bits=128,
        )


def test_unknown_preset_and_metric_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="n8192"):
        Keyring.generate("n1024")
    with pytest.raises(ConfigError, match="euclidean"):
        Metric.parse("manhattan")


# -- keys --------------------------------------------------------------------------------


def test_public_keyring_shares_the_fingerprint_but_cannot_decrypt(small_keyring: Keyring) -> None:
    public = small_keyring.public()
    assert not public.is_private
    assert public.fingerprint == small_keyring.fingerprint
    vector = public.encrypt([0.25, 0.5])
    assert small_keyring.decrypt(vector)[:2] == pytest.approx([0.25, 0.5], abs=1e-6)
    with pytest.raises(SecretKeyError, match="cannot decrypt"):
        public.decrypt(vector)
    with pytest.raises(SecretKeyError):
        public.secret_bytes()


def test_ciphertext_from_another_key_is_refused(small_keyring: Keyring) -> None:
    other = Keyring.generate(galois_keys=True)
    foreign = other.encrypt(np.ones(128))
    own = small_keyring.encrypt(np.ones(128))
    with pytest.raises(KeyMismatchError) as caught:
        encrypted_distance(small_keyring, own, foreign, Metric.EUCLIDEAN)
    assert caught.value.expected == small_keyring.fingerprint
    assert caught.value.got == other.fingerprint
    with pytest.raises(KeyMismatchError):
        small_keyring.decrypt(foreign)


def test_secret_key_is_refused_where_a_public_one_is_expected(
    small_keyring: Keyring, tmp_path: Path
) -> None:
    with pytest.raises(SecretKeyError, match="carries a secret key"):
        Keyring.from_bytes(small_keyring.secret_bytes(), expect="public")
    path = tmp_path / "public.txt"
    small_keyring.save_secret(path)  # the mistake: the private context under a public name
    with pytest.raises(SecretKeyError, match="carries a secret key"):
        Keyring.load(path, expect="public")
    with pytest.raises(SecretKeyError, match="no secret key"):
        Keyring.from_bytes(small_keyring.public_bytes(), expect="secret")


def test_private_key_file_is_0600_and_refused_when_readable(
    small_keyring: Keyring, tmp_path: Path
) -> None:
    path = tmp_path / "private.txt"
    small_keyring.save_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path, expect="secret").fingerprint == small_keyring.fingerprint

    path.chmod(0o644)
    with pytest.raises(SecretKeyError, match="chmod 600"):
        Keyring.load(path)
    with pytest.raises(SecretKeyError, match="readable by others"):
        CipherFace(facial_recognition_model="Dlib", cryptosystem=path)


def test_garbage_is_a_ciphertext_error(small_keyring: Keyring, tmp_path: Path) -> None:
    with pytest.raises(CiphertextError):
        Keyring.from_bytes(b"not a context")
    with pytest.raises(CiphertextError):
        small_keyring.load_vector(EncryptedVector(small_keyring.fingerprint, b"\x00" * 64))
    with pytest.raises(CiphertextError):
        EncryptedVector.from_base64("no-separator")
    with pytest.raises(CiphertextError):
        EncryptedVector.from_base64("abc:***")
    with pytest.raises(FileNotFoundError, match="cryptosystem not found"):
        Keyring.load(tmp_path / "absent.txt")


def test_encrypted_vector_text_round_trip(small_keyring: Keyring) -> None:
    vector = small_keyring.encrypt([1.0, 2.0, 3.0])
    again = EncryptedVector.from_base64(vector.to_base64())
    assert again == vector
    assert small_keyring.decrypt(again)[:3] == pytest.approx([1.0, 2.0, 3.0], abs=1e-5)


def test_vector_sizes_are_checked(small_keyring: Keyring) -> None:
    with pytest.raises(ConfigError, match="4096"):
        small_keyring.encrypt(np.zeros(small_keyring.slots + 1))
    with pytest.raises(ConfigError):
        small_keyring.encrypt([])
    a, b = small_keyring.encrypt(np.ones(128)), small_keyring.encrypt(np.ones(512))
    with pytest.raises(ConfigError, match="different dimensions"):
        encrypted_distance(small_keyring, a, b, Metric.EUCLIDEAN)


def test_distances_need_galois_keys() -> None:
    keyring = Keyring.generate(galois_keys=False)
    vector = keyring.encrypt(np.ones(8))
    with pytest.raises(CryptoError, match="Galois"):
        encrypted_distance(keyring, vector, vector, Metric.COSINE)


def test_public_context_is_far_smaller_without_galois_keys(small_keyring: Keyring) -> None:
    with_galois = len(small_keyring.public_bytes(galois_keys=True))
    without = len(small_keyring.public_bytes(galois_keys=False))
    assert without * 10 < with_galois


# -- the original CipherFace key files ------------------------------------------------------


def write_original_key_files(folder: Path) -> tuple[Path, Path]:
    """Key files exactly as the original CipherFace wrote them (128-bit setting)."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60]
    )
    context.generate_galois_keys()
    context.global_scale = 2**40
    private, public = folder / "private.txt", folder / "public.txt"
    private.write_bytes(base64.b64encode(context.serialize(save_secret_key=True)))
    os.chmod(private, 0o600)
    context.make_context_public()
    public.write_bytes(base64.b64encode(context.serialize()))
    return private, public


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_original_key_files_load(tmp_path: Path, metric: str) -> None:
    private_path, public_path = write_original_key_files(tmp_path)
    onprem = CipherFace(
        facial_recognition_model="Dlib", distance_metric=metric, cryptosystem=private_path
    )
    cloud = CipherFace(
        facial_recognition_model="Dlib", distance_metric=metric, cryptosystem=public_path
    )
    assert onprem.keyring.is_private
    assert not cloud.keyring.is_private
    assert onprem.keyring.fingerprint == cloud.keyring.fingerprint

    a, b = embedding_pair(128, seed=3)
    distance = cloud.calculate_encrypted_distance(cloud.encrypt(a), cloud.encrypt(b))
    expected = numpy_distance(a, b, Metric(metric))
    magnitude = 1.0 + float(a @ a + b @ b) if metric == "euclidean" else 3.0
    assert abs(onprem.restore(distance) - expected) <= TOLERANCE["n8192"] * magnitude
    with pytest.raises(SecretKeyError):
        cloud.restore(distance)
