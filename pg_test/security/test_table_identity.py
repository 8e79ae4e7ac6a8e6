"""Table identity (`certyo.table_identity`): every change carries its tracked table's id, taken
from the capture trigger's arguments, and the write-back and a restore's relink follow the id.
The ids are in pg_trigger, which every role reads, and anyone who may create a table may put a
trigger named certyo_capture calling certyo.capture() on it, with any arguments: capture must
take no id that the catalog does not place at the very table the trigger fires on. Same
fixtures and after-test checks as the other security suites (pg_test/conftest.py)."""
import pytest

from harness import wait_for
from helpers import superuser_runs, wait_anchored


def capture_arguments(role, table):
    """The arguments of `table`'s capture trigger, as anyone can read them, SQL-quoted."""
    args = role.sql(f"SELECT encode(tgargs, 'escape') FROM pg_trigger "
                    f"WHERE tgrelid = '{table}'::regclass AND tgname = 'certyo_capture'")
    parts = [p for p in args.split("\\000") if p]
    assert any(p.startswith("table_id=") for p in parts), args
    return parts


@pytest.mark.parametrize("removal", ["ALTER TRIGGER certyo_capture ON {a}.fake RENAME TO gone",
                                     "DROP TABLE {a}.fake"])
def test_a_hand_made_capture_trigger_cannot_carry_another_tables_identity(cluster, attacker, make_role, emulator,
                                                                          removal):
    """An attacker pass: a plain LOGIN role put a hand-made certyo_capture trigger carrying a
    victim's table_id on a table of its own, inserted a row keyed like one of the victim's, and
    renamed the trigger or dropped the table (DROP TRIGGER is refused) in the same transaction.
    The change was delivered; its write-back, finding the attacker's table no longer carrying
    that id, re-pointed it to the table the catalog gives the id, and the victim's row took the
    hash of the attacker's record, marked anchored, and the victim's audit() reported tampering.
    Now capture refuses the trigger: nothing is queued, the victim's row keeps its own hash."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'real')")
    wait_anchored(cluster, f"{s}.orders", 1)
    real = cluster.sql(f"SELECT certyo_record_hash, certyo_anchor_status FROM {s}.orders WHERE id = 1")
    arguments = ", ".join(f"'{p}'" for p in capture_arguments(attacker, f"{s}.orders"))
    forged = attacker.attempt(f"""
        BEGIN;
        CREATE TABLE {a}.fake (id int PRIMARY KEY, v text);
        CREATE TRIGGER certyo_capture AFTER INSERT ON {a}.fake FOR EACH ROW
            EXECUTE FUNCTION certyo.capture({arguments});
        INSERT INTO {a}.fake VALUES (1, 'forged');
        {removal.format(a=a)};
        COMMIT;
    """)
    assert forged.returncode != 0 and "carries an identity that is not this table" in forged.stderr, forged
    assert cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE collection = '{a}.fake'") == "0"
    # A change of the victim's afterwards is still written back, and only its own.
    victim.sql(f"UPDATE {s}.orders SET v = 'real again' WHERE id = 1")
    assert wait_for(lambda: cluster.sql(f"SELECT certyo_anchor_status FROM {s}.orders WHERE id = 1") == "anchored"
                    and cluster.sql(f"SELECT certyo_record_hash FROM {s}.orders WHERE id = 1") != real.split("|")[0],
                    timeout=30)
    assert [r for r in emulator.records() if r["collection"] == f"{a}.fake"] == []
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{s}.orders')") == "0"
    assert superuser_runs(attacker) == []


def test_a_hand_made_capture_trigger_cannot_claim_an_id_before_it_is_given(cluster, attacker, make_role, emulator):
    """The same, with the id the next certyo.track() will give (the catalog knows it for no
    table yet), the trigger renamed in the same transaction (so no relink sees it): had
    capture taken the id, the next track() would give it to the victim's table, and the
    attacker's changes would follow it there. An id the catalog does not know is refused; the
    victim's rows hold only their own records' hashes."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.first (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.first')")
    parts = capture_arguments(attacker, f"{s}.first")
    given = max(int(p.split("=")[1]) for p in parts if p.startswith("table_id="))
    claimed = f"table_id={given + 1}"
    arguments = ", ".join(f"'{claimed}'" if p.startswith("table_id=") else f"'{p}'" for p in parts)
    forged = attacker.attempt(f"""
        BEGIN;
        CREATE TABLE {a}.early (id int PRIMARY KEY, v text);
        CREATE TRIGGER certyo_capture AFTER INSERT ON {a}.early FOR EACH ROW
            EXECUTE FUNCTION certyo.capture({arguments});
        INSERT INTO {a}.early VALUES (1, 'early');
        ALTER TRIGGER certyo_capture ON {a}.early RENAME TO gone;
        COMMIT;
    """)
    assert forged.returncode != 0 and "not this table's" in forged.stderr, forged
    victim.sql(f"CREATE TABLE {s}.second (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.second'); "
               f"INSERT INTO {s}.second VALUES (1, 'own')")
    wait_anchored(cluster, f"{s}.second", 1)
    held = cluster.sql(f"SELECT certyo_record_hash FROM {s}.second WHERE id = 1")
    own = {r["recordHash"] for r in emulator.records() if r["collection"] == f"{s}.second"}
    assert held in own, (held, own)
    # And after the worker's own relink, still.
    cluster.sql("SELECT certyo.relink_restored(true)")
    victim.sql(f"UPDATE {s}.second SET v = 'own again' WHERE id = 1")
    assert wait_for(lambda: cluster.sql(f"SELECT certyo_record_hash FROM {s}.second WHERE id = 1") != held
                    and cluster.sql(f"SELECT certyo_anchor_status FROM {s}.second WHERE id = 1") == "anchored",
                    timeout=30)
    held = cluster.sql(f"SELECT certyo_record_hash FROM {s}.second WHERE id = 1")
    own = {r["recordHash"] for r in emulator.records() if r["collection"] == f"{s}.second"}
    assert held in own, (held, own)
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{s}.second')") == "0"
