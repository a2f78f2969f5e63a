"""The ledger memory on its own (no service): heads of in-memory trees, signed with test keys."""

from __future__ import annotations

import pytest

from gpunet.credits import LedgerForkError, LedgerKeyError, LedgerVerificationError, MerkleTree, Witness, leaf_hash
from gpunet.credits._ledger import sign_head
from gpunet.credits._witness import HeadLog, check_heads


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def _tree(n, salt=b""):
    return MerkleTree(leaf_hash(salt + str(i).encode()) for i in range(n))


def _head(key, tree, size):
    return sign_head(key, size, tree.root(size), f"2026-01-01T00:00:{size:02d}Z")


@pytest.fixture
def ledger():
    key = _key()
    tree = _tree(40)
    return key, tree, key.public_key().public_bytes_raw().hex()


def test_heads_linked_by_proofs_agree_and_round_trip(ledger):
    key, tree, pub = ledger
    log = HeadLog(pub)
    for size in (3, 17, 40):
        log.add_head(_head(key, tree, size))
    assert log.unlinked() == [3, 17]
    assert log.link_all(tree.consistency_proof) == 2 and log.unlinked() == []
    again = HeadLog.from_json(log.to_json())
    assert again.heads == log.heads and again.links == log.links
    assert check_heads([("a", log.to_json(upto=17)), ("b", log.to_json(since=17))]) == [
        {"key_id": log.key_id, "public_key": pub, "heads": 3, "links": 2, "top": 40}]


def test_two_roots_at_one_size_are_a_fork(ledger):
    key, tree, pub = ledger
    other = _tree(40, salt=b"x")
    log = HeadLog(pub)
    log.add_head(_head(key, tree, 12))
    with pytest.raises(LedgerForkError, match="different roots at the same size 12") as err:
        log.add_head(_head(key, other, 12))
    assert err.value.evidence["earlier"]["root"] == tree.root(12).hex() and log.forks
    with pytest.raises(LedgerForkError, match="different roots at the same size 12"):
        check_heads([("a", _head(key, tree, 12)), ("b", _head(key, other, 12))])


def test_a_later_head_that_does_not_extend_an_earlier_one_is_a_fork(ledger):
    key, tree, pub = ledger
    rewritten = MerkleTree([*(tree.leaf(i) for i in range(10)), *(leaf_hash(b"y%d" % i) for i in range(30))])
    log = HeadLog(pub)
    log.add_head(_head(key, tree, 20))
    log.add_head(_head(key, rewritten, 40))
    with pytest.raises(LedgerForkError, match="does not extend the head at size 20"):
        log.link_all(rewritten.consistency_proof)
    # The common prefix still agrees.
    log2 = HeadLog(pub)
    log2.add_head(_head(key, tree, 10))
    log2.add_head(_head(key, rewritten, 40))
    log2.link_all(rewritten.consistency_proof)


def test_unlinked_heads_need_a_proof(ledger):
    key, tree, pub = ledger
    with pytest.raises(LedgerVerificationError, match="no consistency proof links them. Pass --url"):
        check_heads([("a", _head(key, tree, 5)), ("b", _head(key, tree, 9))])
    assert check_heads([("a", _head(key, tree, 5)), ("b", _head(key, tree, 9))],
                       proofs=lambda k: tree.consistency_proof)[0]["links"] == 1


def test_a_forged_signature_or_a_bad_key_is_refused(ledger, tmp_path):
    key, tree, pub = ledger
    head = _head(key, tree, 5)
    with pytest.raises(LedgerVerificationError, match="not the expected key"):
        HeadLog(_key().public_key().public_bytes_raw().hex()).add_head(head)
    with pytest.raises(LedgerVerificationError, match="64 hex digits"):
        Witness(tmp_path).load("../../etc/passwd")


def test_witness_pins_on_first_use_and_remembers(ledger, tmp_path):
    key, tree, pub = ledger
    memory = Witness(tmp_path)
    note = memory.observe(_head(key, tree, 5), service="https://credits.example", proofs=tree.consistency_proof)
    assert note["pinned_now"] and note["heads"] == 1
    note = memory.observe(_head(key, tree, 30), service="https://credits.example", proofs=tree.consistency_proof,
                          latest=True)
    assert not note["pinned_now"] and note["heads"] == 2 and note["unlinked"] == []
    with pytest.raises(LedgerForkError, match="entries were removed"):
        memory.observe(_head(key, tree, 20), latest=True)
    other = _key()
    with pytest.raises(LedgerKeyError, match="gpunet ledger pin https://credits.example") as err:
        memory.observe(_head(other, tree, 31), service="https://credits.example")
    assert err.value.evidence["pinned"] == pub
    # Offline: a head of another size waits for its proof; one at a size seen is compared at once.
    note = Witness(tmp_path).observe(_head(key, tree, 35))
    assert note["unlinked"] == [5, 30]
    with pytest.raises(LedgerForkError, match="same size 30"):
        Witness(tmp_path).observe(_head(key, _tree(40, salt=b"z"), 30))
    assert Witness(tmp_path).load(pub).forks
