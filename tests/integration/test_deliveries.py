"""The delivery record that keeps a push from going out twice, on the MongoDB wire server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest

from events.subscriptions import RetryPolicy
from shared.deliveries import (
    COMPLETED,
    RELEASED,
    DeliveryInProgress,
    DeliveryRepository,
    device_key,
)
from tests.helpers import Commands
from tests.services import MongoServer, scratch_database, unique

pytestmark = pytest.mark.services

LEASE = 60.0


class _Listeners:
    def __init__(self) -> None:
        self.inserts = Commands("insert", "deliveries")
        self.updates = Commands("update", "deliveries")


@pytest.fixture
def commands() -> _Listeners:
    return _Listeners()


@pytest.fixture
def repo(mongo: MongoServer, commands: _Listeners) -> Iterator[DeliveryRepository]:
    with scratch_database(mongo, "docproc_deliveries_",
                          (commands.inserts, commands.updates)) as db:
        repository = DeliveryRepository(db)
        repository.ensure_indexes()
        yield repository


def test_a_first_claim_is_one_insert_and_leases_the_record(
    repo: DeliveryRepository, commands: _Listeners,
) -> None:
    key = unique("doc-") + ".stored"
    delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
    assert not delivery.completed
    assert delivery.sent_devices == set()
    assert (commands.inserts.count, commands.updates.count) == (1, 0)
    record = repo.get(key)
    assert record is not None
    assert record["state"] == "in_progress"
    assert record["attempts"] == 1
    assert (record["document_id"], record["owner"], record["sent"]) == ("doc-1", "driver-1", [])
    assert record["lease_until"] > record["created_at"]


def test_a_leased_delivery_cannot_be_claimed_again(repo: DeliveryRepository) -> None:
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", LEASE)
    with pytest.raises(DeliveryInProgress):
        repo.claim(key, "doc-1", "driver-1", LEASE)
    assert repo.get(key)["attempts"] == 1  # type: ignore[index]


def test_a_completed_delivery_is_reported_and_left_alone(repo: DeliveryRepository) -> None:
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", LEASE)
    repo.complete(key, {"devices": 1, "sent": 1}, [("token-a", "msg-1")])
    before = repo.get(key)
    delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
    assert delivery.completed
    after = repo.get(key)
    assert after == before
    assert after is not None
    assert after["lease_until"] == COMPLETED


def test_a_released_delivery_is_claimed_again_with_what_was_sent(
    repo: DeliveryRepository,
) -> None:
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", LEASE)
    repo.mark_sent(key, [("token-a", "msg-1")])
    repo.release(key, "FCM asked to come back later")
    assert repo.get(key)["lease_until"] == RELEASED  # type: ignore[index]
    delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
    assert not delivery.completed
    assert (delivery.owes("token-a"), delivery.owes("token-b")) == (False, True)
    record = repo.get(key)
    assert record is not None
    assert record["attempts"] == 2
    assert record["state"] == "in_progress"
    assert record["lease_until"] > record["updated_at"]


def test_a_delivery_record_names_devices_by_digest_never_by_token(
    repo: DeliveryRepository,
) -> None:
    token = "fcm-token-" + "x7" * 70  # registration tokens run to about 160 characters
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", LEASE)
    repo.mark_sent(key, [(token, "msg-1")])
    repo.complete(key, {"devices": 2, "sent": 2}, [("token-b", "msg-2")])
    record = repo.get(key)
    assert record is not None
    assert [(s["device"], s["message_id"]) for s in record["sent"]] == [
        (device_key(token), "msg-1"), (device_key("token-b"), "msg-2")]
    assert token not in repr(record)
    assert "token-b" not in repr(record)


def test_a_record_from_before_device_keys_still_spares_its_devices(
    repo: DeliveryRepository,
) -> None:
    """A delivery an earlier version released keeps raw tokens; its retry must not push
    to them again."""
    key = unique("doc-") + ".stored"
    repo.col.insert_one({"_id": key, "document_id": "doc-1", "owner": "driver-1",
                         "state": "in_progress", "lease_until": RELEASED, "attempts": 1,
                         "sent": [{"token": "token-a", "message_id": "msg-1"}]})
    delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
    assert (delivery.owes("token-a"), delivery.owes("token-b")) == (False, True)


def test_a_lapsed_lease_is_taken_over(repo: DeliveryRepository) -> None:
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", lease=-1.0)  # a worker that died holding it
    delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
    assert not delivery.completed
    assert repo.get(key)["attempts"] == 2  # type: ignore[index]


def test_of_concurrent_claims_exactly_one_wins(repo: DeliveryRepository) -> None:
    keys = [unique("doc-") + ".stored" for _ in range(20)]
    wins: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer() -> None:
        start.wait()
        for key in keys:
            try:
                delivery = repo.claim(key, "doc-1", "driver-1", LEASE)
            except DeliveryInProgress:
                with lock:
                    refused.append(key)
                continue
            assert not delivery.completed
            with lock:
                wins.append(key)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == sorted(keys)  # each key won once...
    assert len(refused) == 3 * len(keys)  # ...and refused to the three others
    assert all(repo.get(key)["attempts"] == 1 for key in keys)  # type: ignore[index]


def test_a_refused_claim_says_when_the_lease_ends(repo: DeliveryRepository) -> None:
    """A redelivery that finds the delivery leased is retried no sooner than the lease
    ends, so a crashed holder's lease runs out before the event's retries do."""
    key = unique("doc-") + ".stored"
    repo.claim(key, "doc-1", "driver-1", LEASE)
    with pytest.raises(DeliveryInProgress) as info:
        repo.claim(key, "doc-1", "driver-1", LEASE)
    assert info.value.retry_after is not None
    assert LEASE - 5 < info.value.retry_after <= LEASE
    assert RetryPolicy((1.0, 5.0)).delay_after(1, info.value) == info.value.retry_after


def test_a_lease_is_renewed_before_a_send_it_would_not_outlast(
    repo: DeliveryRepository, commands: _Listeners,
) -> None:
    key = unique("doc-") + ".stored"
    delivery = repo.claim(key, "doc-1", "driver-1", lease=10.0)
    repo.hold(delivery, lease=10.0, needed=5.0)  # enough left: nothing written
    assert commands.updates.count == 0
    repo.hold(delivery, lease=60.0, needed=30.0)  # not enough: renewed
    assert commands.updates.count == 1
    record = repo.get(key)
    assert record is not None
    assert record["lease_until"] - record["created_at"] > timedelta(seconds=55)
    with pytest.raises(DeliveryInProgress):
        repo.claim(key, "doc-1", "driver-1", LEASE)


def test_a_lapsed_holder_neither_renews_nor_releases_the_new_holders_lease(
    repo: DeliveryRepository,
) -> None:
    """A worker whose claim ran out (a slow batch, a stalled process) while another took
    the delivery over must not send beside it, nor free its lease when it gives up."""
    key = unique("doc-") + ".stored"
    first = repo.claim(key, "doc-1", "driver-1", lease=-1.0)  # ran out
    second = repo.claim(key, "doc-1", "driver-1", LEASE)  # taken over
    assert second.holder != first.holder
    with pytest.raises(DeliveryInProgress):
        repo.hold(first, lease=LEASE, needed=30.0)  # so the first sends nothing
    repo.release(key, "gave up", first.holder)
    with pytest.raises(DeliveryInProgress):
        repo.claim(key, "doc-1", "driver-1", LEASE)  # still the second's
    repo.release(key, "FCM asked to come back later", second.holder)
    assert not repo.claim(key, "doc-1", "driver-1", LEASE).completed
