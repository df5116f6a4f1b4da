"""Encrypted 1:N identification: a column-packed CKKS gallery, split along its roles.

============  ==========  ===============================================================
module        runs on     owns
============  ==========  ===============================================================
`packing`     both        slot layout, scales, SEAL plumbing, `encrypt_probe` (the edge)
`expansion`   both        packed edge probes: one ciphertext (edge), expanded (cloud)
`book`        on-prem     `EnrollmentBook`: plaintext templates, slot allocation, versions
`workers`     both        worker processes: the book's encryption pool, the cloud's shards
`engine`      cloud       `EncryptedGallery`: blocks held and encrypted search
`kernel`      cloud       exact mod-q matrix product: many plaintext probes in one pass
`batching`    cloud       `SearchBatcher`: concurrent probes share a pass (a 5 ms window)
`ranking`     on-prem     `Match`, `accept`, `rank`, `rank_pairs`: decrypt and decide
`decryption`  on-prem     `DecryptionPool`: score blocks decrypted in worker processes
============  ==========  ===============================================================

The payloads that travel between them (`EncryptedBlock`, `BlockScores`,
`EncryptedProbe`) are wire data and live in `cipherface.wire.payloads`, which
loads no TenSEAL; they are re-exported here for existing imports.
"""

from cipherface.gallery.book import EnrollmentBook
from cipherface.gallery.engine import EncryptedGallery
from cipherface.gallery.packing import MAX_SQUARED_NORM, encrypt_probe
from cipherface.gallery.ranking import Match, accept, rank, rank_pairs
from cipherface.wire.payloads import BlockScores, EncryptedBlock, EncryptedProbe

__all__ = [
    "MAX_SQUARED_NORM",
    "BlockScores",
    "EncryptedBlock",
    "EncryptedGallery",
    "EncryptedProbe",
    "EnrollmentBook",
    "Match",
    "accept",
    "encrypt_probe",
    "rank",
    "rank_pairs",
]
