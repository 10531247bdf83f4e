"""Erasure receipts: signed, offline-checkable statements of what the server did to forget.

After unlearning a withdrawn client the server issues a *receipt*: a DSSE envelope
(https://github.com/secure-systems-lab/dsse) signed with Ed25519, whose payload is an in-toto
Statement v1 (https://github.com/in-toto/attestation) with

* **subjects** – the digests of the unlearned model and of the original model (SHA-256 of
  their fp32 encoding, the bytes of ``model.fft``);
* **predicate** ``https://fedforget.dev/erasure-receipt/v1`` – receipt id, issue time, issuer,
  signer key id; the withdrawal request (id, arrival time, stated reason); the withdrawn
  client as a salted commitment :math:`\\mathrm{SHA256}(s \\| \\mathit{id})` (the 32-byte salt
  :math:`s` goes to that client alone); the rounds affected; the history's RFC 9162 Merkle
  tree size and root, with a consistency proof from the head the client saved; the method,
  its version, parameters and seeds; the comparison with the model retrained without the
  client (its digest and metrics); and the digest of the previous receipt, chaining them.

Every round, the server also signs the history's tree head (:func:`sign_tree_head`) and shows
it to the clients, who keep the latest one. Keys rotate through a key manifest in which each
version is signed by the previous current key (:class:`KeyManifest`).

What a receipt proves
---------------------
A receipt that passes :func:`verify_receipt` is the server's **signed, attributable claim**
about what it did: the holder of the signing key stated, at the time it gives, that in answer
to the given request it applied the named method with the stated parameters and seeds to the
stated rounds of the history with the given tree head, turning the model with one digest into
the model with the other, and that it measured the result against a retrained model. The
claim can be checked against things outside the server's control:

* the model files a verifier holds hash to the subjects, so the claim is about *those* models;
* the consistency proof shows that the cited history extends the head the client saved
  during training, so the server cannot have rewritten the rounds the client saw without the
  proof failing;
* the commitment opens (with the client's salt) to that client and to no other;
* an auditor given the history store can recompute the root from the round records, check
  the affected rounds, and re-run a deterministic method from the stated seeds to reproduce
  the unlearned model's digest.

A false receipt is therefore evidence against the key holder; it is not undetectable.

What a receipt does not prove
-----------------------------
It does **not** prove that no information about the client remains in the model, nor that
the server's other copies (backups, logs, other models) were erased, nor that the stated
method actually ran: it attests to what the server says it did. In particular, closeness of
the unlearned model to the retrained one is not proof of erasure. Thudi et al., "On the
Necessity of Auditable Algorithmic Definitions for Machine Unlearning" (USENIX Security 2022,
https://arxiv.org/abs/2110.11891) show that the same weights can be reached by training with
or without a given example, so no test on the weights alone can show that the example's
influence is gone; unlearning can only be audited as a claim about the algorithm that was
run, which is what the method, parameters, seeds and history in the receipt make checkable.
The comparison figures are measurements, reported as such.

Other limits: times in a receipt are the signer's own; a stolen key can sign back-dated
receipts until it is revoked from a time before the theft; the consistency proof protects
only the history up to the head a client actually kept; the commitment hides the client id
only while its salt stays secret.

Modules
-------
:mod:`~fedforget.receipts.merkle` (RFC 9162 tree, proofs), :mod:`~fedforget.receipts.dsse`
(PAE, envelopes), :mod:`~fedforget.receipts.keys` (key ids, key files),
:mod:`~fedforget.receipts.manifest` (rotation, revocation), :mod:`~fedforget.receipts.tree_head`,
:mod:`~fedforget.receipts.statement` (wire schema), :mod:`~fedforget.receipts.receipt`
(building), :mod:`~fedforget.receipts.verify` (checking), :mod:`~fedforget.receipts.cli`.
"""

from __future__ import annotations

from fedforget.receipts.dsse import envelope_bytes, pae, parse_envelope, sign_envelope
from fedforget.receipts.errors import (
    ClientCommitmentError,
    ConsistencyProofError,
    EnvelopeError,
    InclusionProofError,
    KeyManifestError,
    PayloadTypeError,
    PredicateError,
    PredicateVersionError,
    PreviousReceiptError,
    ReceiptError,
    SignatureError,
    SigningKeyError,
    StatementError,
    SubjectDigestError,
    TreeHeadError,
)
from fedforget.receipts.keys import (
    GeneratedKeys,
    generate_keys,
    key_id,
    load_private_key,
    load_public_key,
)
from fedforget.receipts.manifest import KeyManifest, ManifestKey
from fedforget.receipts.merkle import (
    MerkleAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from fedforget.receipts.receipt import (
    ReceiptInput,
    build_receipt,
    client_commitment,
    commit_history,
    new_client_salt,
    receipt_digest,
    write_receipt,
)
from fedforget.receipts.statement import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    Comparison,
    Consistency,
    ErasureStatement,
    HistoryCommitment,
)
from fedforget.receipts.tree_head import (
    TreeHead,
    sign_tree_head,
    tree_head_for,
    verify_head_extends,
    verify_tree_head,
)
from fedforget.receipts.verify import VerifiedReceipt, summary_line, verify_receipt

__all__ = [
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "ClientCommitmentError",
    "Comparison",
    "Consistency",
    "ConsistencyProofError",
    "EnvelopeError",
    "ErasureStatement",
    "GeneratedKeys",
    "HistoryCommitment",
    "InclusionProofError",
    "KeyManifest",
    "KeyManifestError",
    "ManifestKey",
    "MerkleAccumulator",
    "PayloadTypeError",
    "PredicateError",
    "PredicateVersionError",
    "PreviousReceiptError",
    "ReceiptError",
    "ReceiptInput",
    "SignatureError",
    "SigningKeyError",
    "StatementError",
    "SubjectDigestError",
    "TreeHead",
    "TreeHeadError",
    "VerifiedReceipt",
    "build_receipt",
    "client_commitment",
    "commit_history",
    "consistency_proof",
    "envelope_bytes",
    "generate_keys",
    "inclusion_proof",
    "key_id",
    "leaf_hash",
    "load_private_key",
    "load_public_key",
    "new_client_salt",
    "pae",
    "parse_envelope",
    "receipt_digest",
    "sign_envelope",
    "sign_tree_head",
    "summary_line",
    "tree_head_for",
    "tree_root",
    "verify_consistency",
    "verify_head_extends",
    "verify_inclusion",
    "verify_receipt",
    "verify_tree_head",
    "write_receipt",
]
