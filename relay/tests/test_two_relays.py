"""Two certyo-relay processes on one MySQL/MariaDB source (replicas, for availability): one
holds the source's lease and works it, the other stands by; no change is sent twice or recorded
twice, and no row is fought over; when the working one is killed (`kill -9`, mid-batch), the
other carries on. Fixtures in conftest.py."""
import json

from conftest import Relay
from harness import wait_for  # pg_test/, on the path by conftest.py


def leader_and_standby(relays):
    """The relay that holds the lease and the one standing by, once each has said so."""
    def said():
        holding = [r for r in relays if "this relay holds the source's lease" in r.output()]
        waiting = [r for r in relays if "standing by" in r.output()]
        return len(holding) == 1 and len(waiting) == len(relays) - 1 and holding[0] not in waiting
    assert wait_for(said, timeout=20), [r.output()[-2000:] for r in relays]
    leader = next(r for r in relays if "this relay holds the source's lease" in r.output())
    return leader, [r for r in relays if r is not leader]


def batches(relay):
    return relay.output().count(" batch source=")


def all_anchored(shop, count):
    """Every change delivered, and every row written back with its newest receipt, anchored."""
    return shop.drained() and shop.value(
        "SELECT COUNT(*) FROM products t WHERE t.certyo_anchor_status = 'anchored' AND t.certyo_record_hash = "
        "(SELECT q.record_hash FROM certyo_queue q WHERE q.record_id = CAST(t.id AS CHAR) ORDER BY q.id DESC LIMIT 1)"
    ) == str(count)


def assert_each_change_once(emulator, shop):
    keys = [r["idempotencyKey"] for r in emulator.records() if r["database"] == shop.name]
    assert len(keys) == len(set(keys)), "Certyo holds a change twice"
    queued = {k for (k,) in shop.sql("SELECT idempotency_key FROM certyo_queue")}
    assert set(keys) == queued, f"Certyo {len(keys)} vs queued {len(queued)}"
    # Recorded once: one attempt each, every one delivered.
    assert shop.sql("SELECT status, MIN(attempts), MAX(attempts), COUNT(*) FROM certyo_queue GROUP BY status") == \
        [["delivered", "1", "1", str(len(queued))]]


def test_two_relays_share_one_source_and_one_carries_on_after_kill_9(shop, emulator, tmp_path):
    relays = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            relays.append(Relay(tmp_path / name, emulator, shop, batch_size=25).start())
        leader, (standby,) = leader_and_standby(relays)

        # Changes committed while both run, in many transactions: each sent once, by one relay.
        for commit in range(20):
            shop.sql("INSERT INTO products (id, name, price) VALUES "
                     + ", ".join(f"({i}, 'p{i}', 1)" for i in range(commit * 10 + 1, commit * 10 + 11)))
        assert wait_for(lambda: all_anchored(shop, 200), timeout=60), shop.queue()[-5:]
        assert_each_change_once(emulator, shop)
        assert emulator.stats()["replayed"] == 0, "a change was sent twice"
        assert batches(leader) > 0 and batches(standby) == 0, "both relays delivered"
        for r in relays:
            assert "WARN" not in r.output() and "ERROR" not in r.output(), r.output()[-3000:]

        # The leader is killed mid-batch: Certyo has accepted the batch, its answer is slow and
        # never read. The other relay takes the lease and sends the batch again under the same
        # keys (Certyo answers it as a replay), records it once, and goes on.
        emulator.fault("slow", seconds=5)
        shop.sql("INSERT INTO products (id, name, price) VALUES "
                 + ", ".join(f"({i}, 'p{i}', 2)" for i in range(201, 221)))
        in_flight = lambda: sum(r["database"] == shop.name for r in emulator.records()) == 220  # noqa: E731
        assert wait_for(in_flight, timeout=20)
        assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending'") == "20", \
            "the batch was recorded before the kill"
        leader.kill()
        assert wait_for(lambda: "this relay holds the source's lease" in standby.output(), timeout=20), standby.output()
        for commit in range(5):
            shop.sql("INSERT INTO products (id, name, price) VALUES "
                     + ", ".join(f"({i}, 'p{i}', 3)" for i in range(221 + commit * 10, 231 + commit * 10)))
        shop.sql("UPDATE products SET price = 4 WHERE id <= 50")
        assert wait_for(lambda: all_anchored(shop, 270), timeout=60), shop.queue()[-5:]
        assert_each_change_once(emulator, shop)
        assert emulator.stats()["replayed"] == 20, "only the killed relay's batch in flight is sent again"
        status = json.loads(standby.command("status", "--json").stdout)
        assert (status["pending"], status["dead"], status["not_written_back"]) == (0, 0, 0), status
        assert status["lease"].startswith("held by connection "), status

        # Started again, the killed relay stands by: the lease stays where it is.
        again = Relay(leader.config.parent, emulator, shop, batch_size=25)
        since = len(leader.output())  # the same log file, appended to
        relays.append(again.start())
        assert wait_for(lambda: "standing by" in again.output()[since:], timeout=20), again.output()[since:]
        shop.sql("INSERT INTO products (id, name, price) VALUES (500, 'late', 1)")
        assert wait_for(lambda: all_anchored(shop, 271), timeout=30), shop.queue()[-5:]
        assert_each_change_once(emulator, shop)
        assert again.output()[since:].count(" batch source=") == 0, \
            "the restarted relay delivered while the other held the lease"
        # With every relay stopped, the lease is free: status says so.
        for r in relays:
            r.stop()
        status = json.loads(standby.command("status", "--json").stdout)
        assert status["lease"] == "free: no relay works this source", status
    finally:
        for r in relays:
            r.stop()
