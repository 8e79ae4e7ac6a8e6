"""Security: the Certyo API key is never shown to ordinary roles, never logged, and masked where
Certyo echoes it.

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import os
import pwd
import uuid

import pytest

from conftest import DIR
from harness import KEY, wait_for
from helpers import count_rows, make_table, reload, wait_written_back


# ---------------------------------------------------------------------------------------------
# The API key


def test_api_key_is_hidden_from_settings(cluster, attacker):
    """Attack: read the API key through SHOW, current_setting() and pg_settings. An ordinary
    role gets 42501; neither pg_settings nor SHOW ALL lists it, even for a superuser."""
    assert cluster.sql("SELECT count(*) FROM pg_settings WHERE name = 'certyo.api_key'") == "0"
    show_all = cluster.sql("SHOW ALL")
    assert "certyo.api_key" not in [line.split("|")[0] for line in show_all.splitlines()], \
        "SHOW ALL does not list it"
    assert KEY not in show_all, "...nor does it show its value"
    for statement in ("SHOW certyo.api_key", "SELECT current_setting('certyo.api_key')"):
        attempt = attacker.attempt(statement)
        assert attempt.sqlstate == "42501", (statement, attempt)
    attempt = attacker.attempt("SHOW ALL; SELECT setting FROM pg_settings;")
    assert attempt.sqlstate is None, attempt
    assert KEY not in attempt.stdout


def wait_unauthorized(cluster, timeout=30):
    return wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "unauthorized", timeout)


def test_api_key_never_logged(cluster, attacker):
    """Attack (on the log's readers): the key set with ALTER SYSTEM and reloaded must not
    appear in the server log, where Postgres reports changed parameters."""
    key = f"leak-check-{uuid.uuid4().hex}"
    table = make_table(attacker)
    offset = cluster.log_size()
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key = '{key}'")
        reload(cluster)
        changed = wait_for(lambda: any("certyo.api_key" in line and "changed" in line
                                       for line in cluster.log_since(offset).splitlines()), 30)
        assert changed, "the server log never said that certyo.api_key changed"
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        assert wait_unauthorized(cluster), "the worker did not take the new key (Certyo does not know it)"
        assert key not in cluster.log(), "the API key is in the server log"
        assert key not in cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    wait_written_back(cluster, table, 1)
    assert key not in cluster.log(), "the API key is in the server log"


def write_key_file(path, key):
    with open(path, "w") as f:
        f.write(key + "\n")
    postgres = pwd.getpwnam("postgres")
    os.chown(path, postgres.pw_uid, postgres.pw_gid)
    os.chmod(path, 0o600)


def test_api_key_file(cluster, attacker):
    """certyo.api_key_file names a file (postgres's, mode 0600) holding the key, used instead
    of certyo.api_key: with it set and certyo.api_key empty, changes are delivered; with a wrong
    key in the file the worker reports 'unauthorized' without showing the key, anywhere."""
    path = f"{DIR}/api-key-{uuid.uuid4().hex}"
    wrong = f"wrong-key-{uuid.uuid4().hex}"
    write_key_file(path, KEY)
    table = make_table(attacker)
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{path}'")
        # Not RESET: that would fall back to the key in postgresql.conf and prove nothing.
        cluster.sql("ALTER SYSTEM SET certyo.api_key = ''")
        reload(cluster)
        assert wait_for(lambda: cluster.sql("SELECT current_setting('certyo.api_key_file')") == path, 30)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        wait_written_back(cluster, table, 1)

        write_key_file(path, wrong)
        reload(cluster)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (2)")
        assert wait_unauthorized(cluster), cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert count_rows(cluster, table, "id = 2 AND certyo_record_hash IS NULL") == 1
        assert wrong not in cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert wrong not in cluster.log(), "the key from the file is in the server log"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file", check=False)
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    wait_written_back(cluster, table, count_rows(cluster, table))


# Statements that set the key, in spellings the server's parser accepts ({k}: the key), each
# run with log_statement = 'all' and log_min_duration_statement = 0 (and the default
# log_min_error_statement = error, which logs the statement of a failed one).
KEY_STATEMENTS = {
    "spaces": "ALTER SYSTEM SET certyo . api_key = '{k}';",
    "quoted-name": 'ALTER SYSTEM SET "certyo"."api_key" = \'{k}\';',
    "comment-in-name": "ALTER SYSTEM SET certyo/**/.api_key = '{k}';",
    "upper-case": "ALTER SYSTEM SET CERTYO.API_KEY = '{k}';",
    "to-and-newlines": 'ALTER SYSTEM SET "CERTYO"\n  . api_key\n  TO\n  \'{k}\';',
    "unquoted-value": "ALTER SYSTEM SET certyo.api_key = {k};",
    "dollar-quoted-value": "ALTER SYSTEM SET certyo.api_key = $${k}$$;",
    "escape-string-value": "ALTER SYSTEM SET certyo.api_key = E'{k}';",
    "unicode-escaped-name": 'ALTER SYSTEM SET U&"certyo".U&"api\\005fkey" = \'{k}\';',
    "syntax-error-after": "ALTER SYSTEM SET \"certyo\".api_key = '{k}' garbage;",
    "unterminated-string": "ALTER SYSTEM SET certyo . api_key = '{k}",
    "alter-database": "ALTER DATABASE postgres SET certyo . api_key = '{k}';",
    "alter-role": 'ALTER ROLE postgres SET "certyo"."api_key" TO \'{k}\';',
    "session-set": "SET certyo .api_key TO '{k}';",
    "set-config": "SELECT set_config('CERTYO.api_key', '{k}', false);",
    "set-config-named-arguments": "SELECT set_config(new_value => '{k}', setting_name => 'certyo.api_key', is_local => false);",
    "set-config-unquoted-value": "SELECT set_config('certyo.api_key', {k}, false);",
    "set-config-bound-parameter": "SELECT set_config('certyo.api_key', $1, false) \\bind '{k}' \\g",
    "prepared-statement": "PREPARE set_key(text) AS SELECT set_config('certyo.api_key', $1, false);\nEXECUTE set_key('{k}');",
}


@pytest.mark.parametrize("case", list(KEY_STATEMENTS))
def test_api_key_set_in_any_spelling_is_not_logged(cluster, case):
    """Attack (on the log's readers): the key is set with a statement that every log setting
    writes out (log_statement = 'all', log_min_duration_statement = 0, the statement of an
    error), spelled as the parser allows: spaces, quotes or a comment in the name, upper case,
    TO, a value unquoted, dollar- or E-quoted, a Unicode-escaped name, a syntax error after the
    value or an unterminated string, ALTER DATABASE / ROLE, SET, set_config() with the name in
    any case, by named arguments, with the key as a bound parameter or as the argument of a
    prepared statement's EXECUTE. The log says that a
    statement ran, never the key (nor any part of it as long as its random half)."""
    secret = uuid.uuid4().hex
    key = f"leak_check_{secret}"  # a valid identifier too, for the unquoted value
    statement = KEY_STATEMENTS[case].format(k=key)
    offset = cluster.log_size()
    try:
        attempt = cluster.attempt_verbose("SET log_statement = 'all';\nSET log_min_duration_statement = 0;\n"
                                          f"{statement}\n", stop_on_error=False)
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        cluster.sql("ALTER DATABASE postgres RESET certyo.api_key")
        cluster.sql("ALTER ROLE postgres RESET certyo.api_key")
    log = cluster.log_since(offset)
    assert "log_min_duration_statement" in log, f"the statements were not logged: {log[-2000:]}"
    assert secret not in log, f"the API key is in the server log ({attempt!r}):\n{log[-3000:]}"


def test_api_key_echoed_by_certyo_is_masked(cluster, attacker, emulator):
    """Attack (on the readers of the log, certyo.worker_status(), certyo.status and
    certyo.history()): Certyo's answer quotes the API key it was sent, which came from
    certyo.api_key_file: a 400 (the change becomes a dead letter, its error kept) and a 401
    (the worker stops, saying what Certyo answered). The answers are recorded and shown, the
    key in them masked."""
    path = f"{DIR}/api-key-{uuid.uuid4().hex}"
    write_key_file(path, KEY)
    table = make_table(attacker)
    offset = cluster.log_size()
    echoed = "request refused for X-API-Key"
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{path}'")
        # Not RESET: the key would come from postgresql.conf, where the log hook knows it.
        cluster.sql("ALTER SYSTEM SET certyo.api_key = ''")
        reload(cluster)
        assert cluster.wait_passes(2), cluster.explain()
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        wait_written_back(cluster, table, 1)

        emulator.fault("echo-key", status=400)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (2)")
        dead = f"SELECT last_error FROM certyo.delivery WHERE state = 'dead' AND record_id = '2' AND relid = '{table}'::regclass"
        assert wait_for(lambda: echoed in cluster.sql(dead), 30), cluster.explain()
        shown = "\n".join([cluster.sql(dead),
                           cluster.sql(f"SELECT row_to_json(h)::text FROM certyo.history('{table}', '2') h"),
                           cluster.sql("SELECT row_to_json(s)::text FROM certyo.status s"),
                           cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")])
        assert echoed in shown and KEY not in shown, shown

        emulator.fault("echo-key", status=401)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (3)")
        assert wait_unauthorized(cluster), cluster.explain()
        status = cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert echoed in status and KEY not in status, status
        log = cluster.log_since(offset)
        assert echoed in log, log[-3000:]
        assert KEY not in log, f"the key from the file is in the server log:\n{log[-3000:]}"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file", check=False)
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    cluster.sql(f"SELECT certyo.retry('{table}')")
    wait_written_back(cluster, table, 3)


def test_api_key_file_must_be_a_regular_file(cluster, attacker):
    """Attack (on delivery): certyo.api_key_file names a FIFO, which a read waits on until
    someone writes to it, forever. The worker refuses it, says why, and goes on serving."""
    fifo = f"{DIR}/api-key-fifo-{uuid.uuid4().hex}"
    os.mkfifo(fifo, 0o600)
    postgres = pwd.getpwnam("postgres")
    os.chown(fifo, postgres.pw_uid, postgres.pw_gid)
    table = make_table(attacker)
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{fifo}'")
        reload(cluster)
        refused = wait_for(lambda: "is not a regular file" in cluster.sql("SELECT detail FROM certyo.worker_status()"), 30)
        assert refused, cluster.explain()
        assert cluster.sql("SELECT state FROM certyo.worker_status()") == "not configured"
    finally:
        # A worker that waits in open() or read() on the FIFO gets a writer, and the end of it.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waits: nothing to release
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file")
        reload(cluster)
        os.unlink(fifo)
    attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_written_back(cluster, table, 1)
