//! What differs between the PostgreSQL versions certyo_cdc builds for (15, 17, 18): each
//! server API that moved, behind one function, so the rest of the crate has no `cfg`.

use pgrx::pg_sys;

/// The attribute at `index` (0-based) of a tuple descriptor. PostgreSQL 18 keeps attributes
/// behind `TupleDescAttr` (its descriptor also holds compact attributes); earlier versions
/// keep them in the `attrs` array.
///
/// # Safety
/// `desc` is a valid tuple descriptor and `index < natts`; the reference lives no longer than
/// the descriptor.
pub unsafe fn attribute<'a>(
    desc: pg_sys::TupleDesc,
    index: usize,
) -> &'a pg_sys::FormData_pg_attribute {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        #[cfg(feature = "pg18")]
        {
            &*pg_sys::TupleDescAttr(desc, index as std::ffi::c_int)
        }
        #[cfg(not(feature = "pg18"))]
        {
            &*(*desc).attrs.as_ptr().add(index)
        }
    }
}

/// Whether the current user owns (or is a superuser or a member of the owner of) the table.
/// PostgreSQL 16 replaced `pg_class_ownercheck` with the general `object_ownercheck`.
///
/// # Safety
/// Inside a transaction.
pub unsafe fn owns_table(relid: pg_sys::Oid) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId())
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::object_ownercheck(pg_sys::RelationRelationId, relid, pg_sys::GetUserId())
        }
    }
}

/// This backend's process number, the index of its PGPROC (and latch) in `ProcGlobal`.
/// PostgreSQL 17 replaced `PGPROC.pgprocno` with the global `MyProcNumber`.
///
/// # Safety
/// In a backend or background worker whose PGPROC is set up.
pub unsafe fn my_proc_number() -> i32 {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            (*pg_sys::MyProc).pgprocno
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::MyProcNumber
        }
    }
}

/// Whether the current user owns (or is a superuser or a member of the owner of) the database.
///
/// # Safety
/// Inside a transaction.
pub unsafe fn owns_database(database: pg_sys::Oid) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::pg_database_ownercheck(database, pg_sys::GetUserId())
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, database, pg_sys::GetUserId())
        }
    }
}

/// `TimeoutId`'s `USER_TIMEOUT`, the first user-defined timeout reason: PostgreSQL 17 added
/// `TRANSACTION_TIMEOUT` before it.
#[cfg(feature = "pg15")]
pub const USER_TIMEOUT: std::ffi::c_int = 12;
#[cfg(not(feature = "pg15"))]
pub const USER_TIMEOUT: std::ffi::c_int = 13;

/// Install `handler` for signal `signo` in this process. PostgreSQL 18 renamed the backend's
/// `pqsignal` to `pqsignal_be`, which returns nothing.
///
/// # Safety
/// `handler` is safe to run in a signal handler.
pub unsafe fn set_signal_handler(
    signo: std::ffi::c_int,
    handler: unsafe extern "C-unwind" fn(std::ffi::c_int),
) {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        {
            let _previous = pg_sys::pqsignal(signo, Some(handler));
        }
        #[cfg(feature = "pg18")]
        {
            pg_sys::pqsignal_be(signo, Some(handler));
        }
    }
}
