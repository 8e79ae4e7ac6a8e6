//! The modes' logic against the in-memory fake (`fake.rs`).

use super::fake::{lsn, Fake, State};
use super::*;
use crate::source::{Operation, Source};
use std::sync::{Arc, Mutex};

const T: &str = "dbo.Products";

fn setup(mode: Mode) -> Arc<Mutex<State>> {
    let mut st = State {
        installation: "inst00000001".into(),
        ..State::default()
    };
    let ci = (mode == Mode::Cdc).then(|| "dbo_Products".to_string());
    st.tracked.push((T.into(), mode.as_str().into(), 1, ci));
    if mode != Mode::Queue {
        let version = (mode == Mode::ChangeTracking).then_some(0);
        st.progress.insert(T.into(), (None, version, None));
    }
    Arc::new(Mutex::new(st))
}

fn source(state: &Arc<Mutex<State>>, mode: Mode) -> SqlServer {
    let sessions = state.clone();
    let mut s = SqlServer::with_db(
        Box::new(Fake::new(state.clone())),
        Box::new(move || Ok(Box::new(Fake::new(sessions.clone())) as Box<dyn db::Db>)),
        mode,
        "fake".into(),
        "shop".into(),
    );
    s.check().unwrap();
    s
}

fn write(state: &Arc<Mutex<State>>, record: &str, payload: Option<&str>) {
    state.lock().unwrap().write(T, record, payload, true);
}

fn delivered(hash: &str) -> Fate {
    Fate::Delivered {
        record_hash: hash.into(),
        replayed: false,
        verify_after: Duration::from_secs(90),
    }
}

fn retry() -> Fate {
    Fate::Retry {
        retry_after: Duration::ZERO,
        error: "HTTP 503".into(),
    }
}

fn records(changes: &[Change]) -> Vec<&str> {
    changes.iter().map(|c| c.record_id.as_str()).collect()
}

fn st(state: &Arc<Mutex<State>>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap()
}

// ---------------------------------------------------------------- queue mode

#[test]
fn queue_takes_one_change_per_record_records_verifies_and_cleans_up() {
    let state = setup(Mode::Queue);
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A"}"#));
    write(&state, "2", Some(r#"{"Id":2,"Sku":"B"}"#));
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A2"}"#));
    let mut src = source(&state, Mode::Queue);

    let taken = src.take(10, false, &[]).unwrap();
    assert_eq!(
        records(&taken),
        ["1", "2"],
        "record 1's second change waits for its first"
    );
    assert_eq!(taken[0].idempotency_key, "abcdef012345-1");
    assert_eq!(taken[0].source_timestamp, "2026-04-14T10:30:00.123456Z");
    assert!(
        src.take(10, false, &[1, 2]).unwrap().is_empty(),
        "in flight: skipped, and record 1 still waits"
    );

    src.record(&[
        (taken[0].clone(), delivered("sha256:a1")),
        (taken[1].clone(), delivered("sha256:b")),
    ])
    .unwrap();
    {
        let s = st(&state);
        assert_eq!(s.queue[0].status, "delivered");
        assert_eq!(s.queue[0].anchor_status.as_deref(), Some("pending"));
        // Record 1 has a newer change queued: its row holds newer content, no write-back.
        assert_eq!(s.write_backs.len(), 1);
        assert_eq!(s.write_backs[0].1, r#"["2"]"#);
        assert_eq!(
            s.rows[&(T.to_string(), "2".to_string())].hash.as_deref(),
            Some("sha256:b")
        );
        assert_eq!(s.queue.len(), 3, "the write-back queued nothing");
    }
    let next = src.take(10, false, &[]).unwrap();
    assert_eq!(records(&next), ["1"]);
    assert_eq!(next[0].payload, r#"{"Id":1,"Sku":"A2"}"#);

    // Verification is due after verify_after.
    assert!(src.due_for_verification(10).unwrap().is_empty());
    st(&state).now_ms += 91_000;
    let due = src.due_for_verification(10).unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].accepted_age, Duration::from_secs(91));
    src.record_anchoring(&[
        (
            due[0].clone(),
            Anchoring::Anchored {
                polygon_tx_hash: Some("0x9f".into()),
            },
        ),
        (
            due[1].clone(),
            Anchoring::Later {
                after: Duration::from_secs(120),
                overdue: true,
                error: None,
            },
        ),
    ])
    .unwrap();
    {
        let s = st(&state);
        assert_eq!(s.queue[0].anchor_status.as_deref(), Some("anchored"));
        assert_eq!(s.queue[1].anchor_status.as_deref(), Some("overdue"));
        let wb = s.write_backs.last().unwrap();
        assert_eq!(
            (wb.3.as_str(), wb.4.as_deref()),
            ("anchored", Some("sha256:a1")),
            "only if the row holds this hash"
        );
    }
    assert_eq!(
        src.clean_up(Duration::from_secs(3600)).unwrap(),
        0,
        "younger than the retention"
    );
    st(&state).now_ms += 3_600_000;
    assert_eq!(
        src.clean_up(Duration::from_secs(3600)).unwrap(),
        1,
        "the anchored row only"
    );
    let status = src.status().unwrap();
    assert_eq!(
        (
            status.pending,
            status.delivered,
            status.anchored,
            status.dead
        ),
        (1, 1, 0, 0)
    );
}

#[test]
fn queue_retries_after_the_back_off_and_keeps_dead_letters() {
    let state = setup(Mode::Queue);
    write(&state, "1", Some(r#"{"Id":1}"#));
    write(&state, "1", Some(r#"{"Id":1,"x":2}"#));
    write(&state, "2", Some(r#"{"Id":2}"#));
    let mut src = source(&state, Mode::Queue);
    let taken = src.take(10, false, &[]).unwrap();
    src.record(&[
        (
            taken[0].clone(),
            Fate::Dead {
                status: 422,
                error: "bad payload".into(),
            },
        ),
        (
            taken[1].clone(),
            Fate::Retry {
                retry_after: Duration::from_secs(30),
                error: "HTTP 503".into(),
            },
        ),
    ])
    .unwrap();
    let next = src.take(10, false, &[]).unwrap();
    assert_eq!(
        records(&next),
        ["1"],
        "after a dead letter the record's next change goes on; 2 waits 30 s"
    );
    assert_eq!(next[0].id, 2);
    let probe = src.take(1, true, &[2]).unwrap();
    assert_eq!(
        (probe[0].id, probe[0].attempts),
        (3, 1),
        "probing ignores the retry time"
    );
    st(&state).now_ms += 30_000;
    assert_eq!(src.take(10, false, &[]).unwrap().len(), 2);
    let s = st(&state);
    assert_eq!(
        (s.queue[0].status.as_str(), s.queue[0].last_status),
        ("dead", Some(422))
    );
    assert_eq!(s.queue[2].last_error.as_deref(), Some("HTTP 503"));
    assert!(s.write_backs.is_empty());
}

// ---------------------------------------------------------------- CDC

fn cdc_progress(state: &Arc<Mutex<State>>) -> Option<Vec<u8>> {
    st(state).progress[T].0.clone()
}

#[test]
fn cdc_progress_stops_before_a_transient_failure_and_a_restart_resends_with_the_same_keys() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1}"#)); // LSN 0x1001
    write(&state, "2", Some(r#"{"Id":2}"#)); // 0x1002
    write(&state, "3", Some(r#"{"Id":3}"#)); // 0x1003
    let mut src = source(&state, Mode::Cdc);
    let taken = src.take(10, false, &[]).unwrap();
    assert_eq!(records(&taken), ["1", "2", "3"]);
    assert_eq!(
        taken[0].idempotency_key,
        "inst00000001-dbo.Products-00000000000000001001-00000000000000000001-insert"
    );
    assert_eq!(taken[0].operation, Operation::Insert);

    src.record(&[
        (taken[0].clone(), delivered("h1")),
        (taken[1].clone(), retry()),
        (taken[2].clone(), delivered("h3")),
    ])
    .unwrap();
    assert_eq!(
        cdc_progress(&state),
        Some(lsn(0x1001)),
        "not past the change still retrying"
    );
    assert_eq!(st(&state).receipts.len(), 2);
    assert_eq!(st(&state).receipts[1].lsn, Some(lsn(0x1003)));
    // The write-backs are CDC changes too (bookkeeping only): not read back as changes.
    assert_eq!(st(&state).cdc.len(), 5);

    let again = src.take(10, false, &[]).unwrap();
    assert_eq!(
        records(&again),
        ["2"],
        "3 is delivered: not sent again while the relay runs"
    );
    assert_eq!(again[0].attempts, 1);

    // Restart: memory is gone, progress is persisted. 2 and 3 are read again, with the keys
    // they had (3 is answered as a replay; its receipt is kept once).
    let mut restarted = source(&state, Mode::Cdc);
    let reread = restarted.take(10, false, &[]).unwrap();
    assert_eq!(records(&reread), ["2", "3"]);
    assert_eq!(reread[0].idempotency_key, taken[1].idempotency_key);
    assert_eq!(reread[1].idempotency_key, taken[2].idempotency_key);
    restarted
        .record(&[
            (reread[0].clone(), delivered("h2")),
            (
                reread[1].clone(),
                Fate::Delivered {
                    record_hash: "h3".into(),
                    replayed: true,
                    verify_after: Duration::ZERO,
                },
            ),
        ])
        .unwrap();
    assert_eq!(st(&state).receipts.len(), 3, "one receipt per key");
    assert!(restarted.take(10, false, &[]).unwrap().is_empty());
    // Four write-backs (1, 3, then 2 and 3 again) are CDC rows too, dropped by the mask.
    assert_eq!(
        cdc_progress(&state),
        Some(lsn(0x1003 + 4)),
        "up to the newest LSN read"
    );
    let status = restarted.status().unwrap();
    assert_eq!(
        status.progress.as_deref(),
        Some("dbo.Products LSN 0x00000000000000001007")
    );
    assert_eq!((status.pending, status.delivered), (0, 3));
}

#[test]
fn cdc_drops_tracking_only_updates_and_sends_deletes_with_the_old_image() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A"}"#));
    let mut src = source(&state, Mode::Cdc);
    let first = src.take(10, false, &[]).unwrap();
    src.record(&[(first[0].clone(), delivered("h1"))]).unwrap();
    assert_eq!(
        st(&state).rows[&(T.into(), "1".into())].hash.as_deref(),
        Some("h1")
    );
    assert!(
        src.take(10, false, &[]).unwrap().is_empty(),
        "the write-back is not a change"
    );
    write(&state, "1", None);
    let delete = src.take(10, false, &[]).unwrap();
    assert_eq!(delete[0].operation, Operation::Delete);
    assert_eq!(delete[0].payload, r#"{"Id":1,"Sku":"A"}"#);
    src.record(&[(delete[0].clone(), delivered("h2"))]).unwrap();
    assert_eq!(
        st(&state).write_backs.len(),
        1,
        "no write-back for a delete"
    );
}

#[test]
fn cdc_refuses_to_skip_changes_removed_by_cleanup() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1}"#));
    let mut src = source(&state, Mode::Cdc);
    let taken = src.take(10, false, &[]).unwrap();
    src.record(&[(taken[0].clone(), delivered("h1"))]).unwrap();
    let saved = cdc_progress(&state);
    write(&state, "2", Some(r#"{"Id":2}"#));
    write(&state, "3", Some(r#"{"Id":3}"#));
    // Cleanup removed everything before the last change: the change of 2 is gone.
    let newest = st(&state).cdc.iter().map(|r| r.lsn).max().unwrap();
    st(&state).cdc_min.insert("dbo_Products".into(), newest);
    let err = src.take(10, false, &[]).unwrap_err().0;
    assert!(err.contains("CDC cleanup removed changes"), "{err}");
    assert!(err.contains("sys.fn_cdc_get_min_lsn"), "{err}");
    assert!(
        err.contains("EXEC certyo.ResetProgress @SchemaName = N'dbo', @TableName = N'Products'"),
        "{err}"
    );
    assert_eq!(cdc_progress(&state), saved, "progress untouched");
}

#[test]
fn a_failed_record_commits_nothing_and_changes_nothing_in_memory() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1}"#));
    let mut src = source(&state, Mode::Cdc);
    let taken = src.take(10, false, &[]).unwrap();
    // The first read starts the progress just before the first change it found.
    assert_eq!(cdc_progress(&state), Some(lsn(0x1000)));
    st(&state).fail = Some(statements::PROGRESS_SAVE_LSN);
    assert!(src.record(&[(taken[0].clone(), delivered("h1"))]).is_err());
    assert!(st(&state).receipts.is_empty(), "rolled back");
    assert!(st(&state).write_backs.is_empty(), "rolled back");
    assert_eq!(cdc_progress(&state), Some(lsn(0x1000)));
    let again = src.take(10, false, &[]).unwrap();
    assert_eq!(again, taken, "still to deliver, same id and key");
}

#[test]
fn a_retry_keeps_its_attempts_and_back_off_across_a_restart() {
    for mode in [Mode::Cdc, Mode::ChangeTracking] {
        let state = setup(mode);
        write(&state, "1", Some(r#"{"Id":1}"#));
        let mut src = source(&state, mode);
        let taken = src.take(10, false, &[]).unwrap();
        let later = Fate::Retry {
            retry_after: Duration::from_secs(60),
            error: "HTTP 503".into(),
        };
        src.record(&[(taken[0].clone(), later)]).unwrap();
        assert_eq!(
            st(&state).retries.len(),
            1,
            "{mode:?}: kept in certyo.Retry"
        );
        drop(src);

        // Restarted within the back-off: not sent before it ends (but to probe an outage).
        let mut restarted = source(&state, mode);
        assert!(
            restarted.take(10, false, &[]).unwrap().is_empty(),
            "{mode:?}"
        );
        let probe = restarted.take(1, true, &[]).unwrap();
        assert_eq!(records(&probe), ["1"], "{mode:?}");
        assert_eq!(
            probe[0].attempts, 1,
            "{mode:?}: the count of attempts goes on"
        );
        assert_eq!(probe[0].idempotency_key, taken[0].idempotency_key);
        drop(restarted);

        // Restarted after it: due, still with its attempts; delivered, its retry state goes.
        st(&state).now_ms += 61_000;
        let mut restarted = source(&state, mode);
        let due = restarted.take(10, false, &[]).unwrap();
        assert_eq!((records(&due), due[0].attempts), (vec!["1"], 1), "{mode:?}");
        restarted
            .record(&[(due[0].clone(), delivered("h1"))])
            .unwrap();
        assert!(st(&state).retries.is_empty(), "{mode:?}");
    }
}

#[test]
fn after_reset_progress_the_gap_is_not_sent_and_a_backfill_is() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A"}"#));
    let mut src = source(&state, Mode::Cdc);
    let taken = src.take(10, false, &[]).unwrap();
    src.record(&[(taken[0].clone(), delivered("h1"))]).unwrap();
    write(&state, "2", Some(r#"{"Id":2,"Sku":"B"}"#));
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A2"}"#));
    let newest = st(&state).cdc.iter().map(|r| r.lsn).max().unwrap();
    st(&state).cdc_min.insert("dbo_Products".into(), newest + 1);
    assert!(src.take(10, false, &[]).is_err(), "the gap is refused");

    // The operator resets the table, then backfills: an UPDATE setting a column to itself.
    st(&state).reset_progress(T);
    let mut src = source(&state, Mode::Cdc);
    assert!(
        src.take(10, false, &[]).unwrap().is_empty(),
        "the gap is not sent"
    );
    write(&state, "1", Some(r#"{"Id":1,"Sku":"A2"}"#));
    write(&state, "2", Some(r#"{"Id":2,"Sku":"B"}"#));
    let backfill = src.take(10, false, &[]).unwrap();
    assert_eq!(records(&backfill), ["1", "2"]);
    assert_eq!(
        backfill[0].payload, r#"{"Id":1,"Sku":"A2"}"#,
        "the row as it is now"
    );
    src.record(&[
        (backfill[0].clone(), delivered("h1b")),
        (backfill[1].clone(), delivered("h2")),
    ])
    .unwrap();
    assert!(src.take(10, false, &[]).unwrap().is_empty());
    assert!(
        cdc_progress(&state).unwrap() >= lsn(newest + 2),
        "past the backfill"
    );
}

#[test]
fn two_relays_take_turns_by_the_lease() {
    for mode in [Mode::Queue, Mode::Cdc, Mode::ChangeTracking] {
        let state = setup(mode);
        let mut a = source(&state, mode);
        let mut b = source(&state, mode);
        assert!(a.lease().unwrap(), "{mode:?}: the first to ask");
        assert!(!b.lease().unwrap(), "{mode:?}: the other stands by");
        assert!(a.lease().unwrap() && !b.lease().unwrap(), "{mode:?}: kept");
        assert_eq!(
            b.status().unwrap().lease.as_deref(),
            Some("held by a relay's session")
        );
        assert_eq!(
            a.status().unwrap().lease.as_deref(),
            Some("held by this relay")
        );
        // The working relay is killed: its sessions end, SQL Server releases the lock.
        drop(a);
        assert!(b.lease().unwrap(), "{mode:?}: the other carries on");
        drop(b);
        let mut c = source(&state, mode);
        assert_eq!(
            c.status().unwrap().lease.as_deref(),
            Some("free: no relay works this source")
        );
    }
}

#[test]
fn a_relay_that_takes_the_lease_over_starts_from_the_database() {
    let state = setup(Mode::Cdc);
    write(&state, "1", Some(r#"{"Id":1}"#));
    let mut a = source(&state, Mode::Cdc);
    let mut b = source(&state, Mode::Cdc);
    assert!(b.lease().unwrap());
    // b read the change while it held the lease, then lost it (its session ended) ...
    assert_eq!(records(&b.take(10, false, &[]).unwrap()), ["1"]);
    b.lease_db = None;
    st(&state).applock = None;
    // ... a delivered it meanwhile ...
    assert!(a.lease().unwrap());
    let taken = a.take(10, false, &[]).unwrap();
    a.record(&[(taken[0].clone(), delivered("h1"))]).unwrap();
    drop(a);
    // ... and b, holding it again, does not send it from its memory.
    assert!(b.lease().unwrap());
    assert!(b.take(10, false, &[]).unwrap().is_empty());
}

// ---------------------------------------------------------------- Change Tracking

fn ct_progress(state: &Arc<Mutex<State>>) -> Option<i64> {
    st(state).progress[T].1
}

#[test]
fn change_tracking_progress_and_a_re_read_after_the_write_back_is_not_sent_again() {
    let state = setup(Mode::ChangeTracking);
    write(&state, "2", Some(r#"{"Id":2}"#)); // version 1
    write(&state, "1", Some(r#"{"Id":1}"#)); // version 2
    let mut src = source(&state, Mode::ChangeTracking);
    let taken = src.take(10, false, &[]).unwrap();
    assert_eq!(records(&taken), ["2", "1"]);
    assert_eq!(taken[1].idempotency_key, "inst00000001-dbo.Products-1-ct2");
    src.record(&[
        (taken[0].clone(), retry()),
        (taken[1].clone(), delivered("h1")),
    ])
    .unwrap();
    assert_eq!(
        ct_progress(&state),
        Some(0),
        "not past the change still retrying"
    );
    // The write-back moved record 1 to version 3; read from version 0 its net change is the
    // insert (at version 3), with the payload already delivered: recognised, not sent again.
    assert_eq!(st(&state).ct_version, 3);
    let again = src.take(10, false, &[]).unwrap();
    assert_eq!(records(&again), ["2"]);

    // After a restart too, from the receipts.
    let mut restarted = source(&state, Mode::ChangeTracking);
    let reread = restarted.take(10, false, &[]).unwrap();
    assert_eq!(records(&reread), ["2"]);
    assert_eq!(reread[0].idempotency_key, "inst00000001-dbo.Products-2-ct1");
    restarted
        .record(&[(reread[0].clone(), delivered("h2"))])
        .unwrap();
    assert_eq!(
        ct_progress(&state),
        Some(3),
        "everything read is settled: the current version"
    );
    assert_eq!(st(&state).receipts.len(), 2);
    assert!(
        restarted.take(10, false, &[]).unwrap().is_empty(),
        "write-backs are not re-captured"
    );
    assert_eq!(ct_progress(&state), Some(4));

    // A business change after delivery is a new change with its own key.
    write(&state, "1", Some(r#"{"Id":1,"Sku":"B"}"#));
    let changed = restarted.take(10, false, &[]).unwrap();
    assert_eq!(records(&changed), ["1"]);
    assert_eq!(
        (changed[0].operation, changed[0].idempotency_key.as_str()),
        (Operation::Update, "inst00000001-dbo.Products-1-ct5")
    );
}

#[test]
fn change_tracking_sends_a_delete_with_the_key_columns_and_drops_tracking_only_updates() {
    let state = setup(Mode::ChangeTracking);
    write(&state, "7", Some(r#"{"Id":7,"Sku":"A"}"#));
    let mut src = source(&state, Mode::ChangeTracking);
    let first = src.take(10, false, &[]).unwrap();
    src.record(&[(first[0].clone(), delivered("h7"))]).unwrap();
    // An update of bookkeeping columns only (as an operator might do): not a change.
    st(&state).write(T, "7", Some(r#"{"Id":7,"Sku":"A"}"#), false);
    assert!(src.take(10, false, &[]).unwrap().is_empty());
    write(&state, "7", None);
    let delete = src.take(10, false, &[]).unwrap();
    assert_eq!(delete[0].operation, Operation::Delete);
    assert_eq!(
        delete[0].payload, r#"{"Id":"7"}"#,
        "the row is gone: its key columns are the payload"
    );
    src.record(&[(delete[0].clone(), delivered("h8"))]).unwrap();
    assert_eq!(
        st(&state).write_backs.len(),
        1,
        "no write-back for a delete"
    );
}

#[test]
fn change_tracking_refuses_progress_older_than_the_minimum_valid_version() {
    let state = setup(Mode::ChangeTracking);
    write(&state, "1", Some(r#"{"Id":1}"#));
    write(&state, "2", Some(r#"{"Id":2}"#));
    st(&state).ct_min_valid.insert(T.into(), 1); // retention cleaned up version 1
    let mut src = source(&state, Mode::ChangeTracking);
    let err = src.take(10, false, &[]).unwrap_err().0;
    assert!(
        err.contains("CHANGE_TRACKING_MIN_VALID_VERSION is 1"),
        "{err}"
    );
    assert!(err.contains("certyo.ResetProgress"), "{err}");
    assert_eq!(ct_progress(&state), Some(0), "progress untouched");
    assert!(
        st(&state).sent.contains(&statements::ROLLBACK),
        "the snapshot is ended"
    );
}

#[test]
fn change_tracking_dead_letters_settle_and_superseded_changes_are_dropped() {
    let state = setup(Mode::ChangeTracking);
    write(&state, "1", Some(r#"{"Id":1}"#));
    let mut src = source(&state, Mode::ChangeTracking);
    let taken = src.take(10, false, &[]).unwrap();
    src.record(&[(
        taken[0].clone(),
        Fate::Retry {
            retry_after: Duration::from_secs(60),
            error: "timeout".into(),
        },
    )])
    .unwrap();
    // The row changes again before the retry: change tracking reports only the latest.
    write(&state, "1", Some(r#"{"Id":1,"Sku":"Z"}"#));
    let latest = src.take(10, false, &[]).unwrap();
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0].payload, r#"{"Id":1,"Sku":"Z"}"#);
    src.record(&[(
        latest[0].clone(),
        Fate::Dead {
            status: 422,
            error: "too big".into(),
        },
    )])
    .unwrap();
    assert_eq!(ct_progress(&state), Some(2));
    let dead: Vec<i64> = st(&state).dead.iter().map(|d| d.status).collect();
    assert_eq!(dead, [422]);
    let status = src.status().unwrap();
    assert_eq!(
        (status.dead, status.last_error.as_deref()),
        (1, Some("too big"))
    );
}

// ---------------------------------------------------------------- configuration, statements

#[test]
fn urls_parse_and_describe_without_the_password() {
    let url = Url::parse(
        "sqlserver://relay:s%40cret@db.example.com:1444/shop?trust_server_certificate=true",
    )
    .unwrap();
    assert_eq!(
        (url.user.as_str(), url.password.as_str()),
        ("relay", "s@cret")
    );
    assert_eq!(
        (url.host.as_str(), url.port, url.database.as_str()),
        ("db.example.com", 1444, "shop")
    );
    assert!(url.encrypt && url.trust_server_certificate);
    assert_eq!(url.describe(), "sqlserver://relay@db.example.com:1444/shop");
    let src = SqlServer::connect("sqlserver://relay:pw@h/shop", Mode::Cdc, None).unwrap();
    assert_eq!(src.describe(), "sqlserver://relay@h:1433/shop (cdc)");
    assert_eq!(src.database(), "shop");
    assert!(!src.describe().contains("pw"));
    let other = SqlServer::connect(
        "sqlserver://relay:pw@h/shop",
        Mode::Queue,
        Some("productdb".into()),
    )
    .unwrap();
    assert_eq!(other.database(), "productdb");
    for bad in [
        "mysql://a@b/c",
        "sqlserver://h/shop",
        "sqlserver://u@h:x/shop",
        "sqlserver://u@h/shop?nope=1",
    ] {
        assert!(Url::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(Mode::parse("change_tracking"), Some(Mode::ChangeTracking));
    assert_eq!(Mode::parse("cdc"), Some(Mode::Cdc));
    assert_eq!(Mode::parse("queue"), Some(Mode::Queue));
    assert_eq!(Mode::parse("ct"), None);
}

#[test]
fn timestamps_are_rfc3339_utc_with_microseconds() {
    assert_eq!(
        rfc3339("2026-04-14 10:30:00.1234567"),
        "2026-04-14T10:30:00.123456Z"
    );
    assert_eq!(
        rfc3339("2026-04-14 10:30:00"),
        "2026-04-14T10:30:00.000000Z"
    );
    assert_eq!(
        rfc3339("2026-04-14 10:30:00.5"),
        "2026-04-14T10:30:00.500000Z"
    );
}

#[test]
fn statements_number_their_parameters_without_gaps() {
    for sql in statements::ALL {
        let mut numbers: Vec<usize> = sql
            .match_indices("@P")
            .filter_map(|(i, _)| {
                let digits: String = sql[i + 2..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers, (1..=numbers.len()).collect::<Vec<_>>(), "{sql}");
    }
}
