//! A relation opened with `table_open`, closed when dropped: on every path, `?` and errors
//! unwinding included, so no early return leaks a relcache reference. The lock is kept to the
//! end of the transaction, as the executor keeps it.

use pgrx::pg_sys::{self, Oid};

pub struct OpenRelation(pg_sys::Relation);

impl OpenRelation {
    /// # Safety
    /// Inside a transaction; `relid` names a table (else Postgres raises an error).
    pub unsafe fn open(relid: Oid, lock: u32) -> OpenRelation {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe { OpenRelation(pg_sys::table_open(relid, lock as pg_sys::LOCKMODE)) }
    }

    pub fn get(&self) -> pg_sys::Relation {
        self.0
    }
}

impl Drop for OpenRelation {
    fn drop(&mut self) {
        // SAFETY: opened by `open` in this transaction and closed exactly once, here.
        unsafe { pg_sys::table_close(self.0, pg_sys::NoLock as pg_sys::LOCKMODE) };
    }
}
