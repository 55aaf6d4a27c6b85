"""The audit log: append-only, hash-chained, keyed records in the SQL store.

Every record carries ``prev_hash`` (the hash of the record before it in its
chain) and ``hash``, an HMAC-SHA256 under a key kept outside the store (or
SHA-256 for legacy records written before keys). Editing a record breaks its
hash; deleting or reordering records breaks the next record's ``prev_hash``;
deleting the newest records is caught by the chain's head row and, when
someone also moved the head, by the signed checkpoints in the witness.

**One chain per team** (plus one ``system`` chain for records that belong to
no team, such as an authentication failure with an unknown token): a team is
the service's tenancy boundary, so a team's chain can be exported and
verified on its own, and appends of different teams never wait for each
other.

The package, by concept:

* ``chain``: records, entries and their hashes;
* ``keys``: the key file (create, load, rotate) and the process's keyring;
* ``append``: the SQL that appends under the chain's lock;
* ``writer``: the non-blocking writer task and the checkpointer;
* ``witness``: signed checkpoints and the append-only witness file;
* ``verify``: walking the chains in the store (``report``: what it found);
* ``comment_check``: comments against their ``comment.create`` records;
* ``export``: listing, exporting and verifying an export offline.
"""

from progress_service.store.audit.append import append, audit_records, record, record_for_team_name, team_id_for
from progress_service.store.audit.chain import (
    GENESIS,
    HASH_VERSION,
    KEYED_VERSION,
    SYSTEM_CHAIN,
    AuditRecord,
    Entry,
    canonical_json,
    chain_of,
    compute_hash,
    parse_since,
    scrub,
    to_record,
)
from progress_service.store.audit.export import encode_jsonl, export, list_records, verify_export
from progress_service.store.audit.keys import Keyring
from progress_service.store.audit.report import Mismatch, VerifyResult
from progress_service.store.audit.verify import verify
from progress_service.store.audit.writer import Audit, Checkpointer, audit_dropped, audit_queue

__all__ = [
    "GENESIS",
    "HASH_VERSION",
    "KEYED_VERSION",
    "SYSTEM_CHAIN",
    "Audit",
    "AuditRecord",
    "Checkpointer",
    "Entry",
    "Keyring",
    "Mismatch",
    "VerifyResult",
    "append",
    "audit_dropped",
    "audit_queue",
    "audit_records",
    "canonical_json",
    "chain_of",
    "compute_hash",
    "encode_jsonl",
    "export",
    "list_records",
    "parse_since",
    "record",
    "record_for_team_name",
    "scrub",
    "team_id_for",
    "to_record",
    "verify",
    "verify_export",
]
