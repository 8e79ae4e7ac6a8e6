//! Each table's record key as the write-back needs it ([`RecordKey`]: its name, key columns
//! and how to read them, its owner, whether an UPDATE of it can run its owner's code), kept
//! per table until the catalog changes.
//!
//! Reading it ([`crate::track::key::LOOKUP`]) walks the table's tree, constraints, indexes,
//! defaults, policies, triggers, rules and their dependencies: about a millisecond, which the
//! worker paid at every write-back, so at every pass under load. What it reads changes only by
//! DDL, and DDL says so: every change to a relation's definition (its columns, constraints,
//! indexes, triggers, rules, policies, owner, partitions, or a composite type's attributes)
//! sends a relcache invalidation, and a renamed schema or collation, a type or function given
//! to another owner or schema, an operator moved, a syscache invalidation. Any of them
//! (of any relation, not only the table: a partition's trigger is its parent's business)
//! forgets every kept key, and so does an overflow of the invalidation queue (PostgreSQL then
//! calls every callback).
//!
//! Invalidations are taken in when a transaction starts and when it takes a lock it did not
//! hold. The write-back locks its table before it asks ([`super::write_back`]): DDL on the
//! table holds a conflicting lock until it commits, and sends its invalidations at commit, so
//! by then they are in. (DDL that takes no lock that conflicts with the write-back's, such as a
//! schema renamed, may still commit between the question and the UPDATE, as it could before
//! keys were kept: the next transaction sees it. `ATTACH PARTITION` cannot: a replica-mode
//! write-back closes the tree to it, `crate::rights::lock_closed_tree`.) A key read while
//! an invalidation arrived is not kept (the read may predate it), nor one read under a
//! snapshot older than the lock: SPI reuses the transaction's snapshot for a read-only
//! statement until the transaction has an id, so a key is kept only once it has one (the
//! write-back's lock assigns it), and the worker's sessions are READ COMMITTED whatever the
//! database sets (`super::worker::prepare_session`), so that each statement takes a new one.
//!
//! Any relcache invalidation forgets every key, so a database that creates temporary tables or
//! is vacuumed and analyzed often reads keys more often than the benchmark shows; never less
//! correctly.

use crate::track::key::{RecordKey, LOOKUP};
use pgrx::pg_sys::{self, Oid};
use pgrx::spi::SpiClient;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Most tables kept (a key is a few hundred bytes); past it every key is forgotten and read
/// again when its table's turn comes.
const MAX_KEPT: usize = 1024;

thread_local! {
    /// Per table OID: its key, or None (not tracked, no bookkeeping columns, ...: nothing to
    /// write back to), as [`LOOKUP`] found it.
    static KEPT: RefCell<HashMap<u32, Option<Rc<RecordKey>>>> = RefCell::new(HashMap::new());
    /// Counts the invalidations taken in: a read during which it moved is not kept.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the key kept for table `relid` says that an UPDATE of it runs its owner's code
/// (None: no key kept). A hint, read before the table is locked; [`of`] then says for sure.
pub fn kept_user_code(relid: Oid) -> Option<bool> {
    KEPT.with(|kept| {
        kept.borrow()
            .get(&relid.to_u32())
            .map(|key| key.as_ref().is_some_and(|key| key.user_code))
    })
}

/// The record key of table `relid`, as [`LOOKUP`] reads it (None: nothing to write back to).
/// The caller holds a lock on the table (see the module's comment).
pub fn of(client: &SpiClient<'_>, relid: Oid) -> Result<Option<Rc<RecordKey>>, pgrx::spi::Error> {
    watch_invalidations();
    if let Some(kept) = KEPT.with(|kept| kept.borrow().get(&relid.to_u32()).cloned()) {
        return Ok(kept);
    }
    let generation = GENERATION.get();
    let found = super::prepared::select(client, LOOKUP, &[relid.into()])?;
    let key = RecordKey::from_found(found)?.map(Rc::new);
    // SAFETY: reads this backend's transaction state.
    let has_xid = unsafe { pg_sys::GetCurrentTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if GENERATION.get() == generation && has_xid {
        KEPT.with(|kept| {
            let mut kept = kept.borrow_mut();
            if kept.len() >= MAX_KEPT {
                kept.clear();
            }
            kept.insert(relid.to_u32(), key.clone());
        });
    }
    Ok(key)
}

/// The catalogs a key is read from besides the relations' own (whose changes come as relcache
/// invalidations): schemas (the table's name), collations (the key's), types (the key's, a
/// column's domain or enum, their owners), functions, operators, operator classes and access
/// methods (user code, the key's operators).
const SYSCACHES: [pg_sys::SysCacheIdentifier::Type; 7] = [
    pg_sys::SysCacheIdentifier::NAMESPACEOID,
    pg_sys::SysCacheIdentifier::COLLOID,
    pg_sys::SysCacheIdentifier::TYPEOID,
    pg_sys::SysCacheIdentifier::PROCOID,
    pg_sys::SysCacheIdentifier::OPEROID,
    pg_sys::SysCacheIdentifier::CLAOID,
    pg_sys::SysCacheIdentifier::AMOID,
];

/// Register, once per process, the callbacks that forget every kept key.
fn watch_invalidations() {
    if WATCHING.replace(true) {
        return;
    }
    // SAFETY: registers callbacks once per process, in its main thread; they live as long as
    // the process (PostgreSQL has no way to unregister them, nor needs one).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
        for cache in SYSCACHES {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as std::ffi::c_int,
                Some(on_syscache),
                pg_sys::Datum::from(0),
            );
        }
    }
}

fn forget_all() {
    GENERATION.set(GENERATION.get().wrapping_add(1));
    // Not borrowed here while `of` reads: an invalidation during a read arrives between the
    // borrows (the read holds none), and the generation tells `of` not to keep its result.
    KEPT.with(|kept| kept.borrow_mut().clear());
}

/// # Safety
/// Called only by PostgreSQL, as the relcache callback `watch_invalidations` registers, in
/// the process's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, _relid: Oid) {
    forget_all();
}

/// # Safety
/// Called only by PostgreSQL, as a syscache callback `watch_invalidations` registers, in the
/// process's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_syscache(_arg: pg_sys::Datum, _cache: std::ffi::c_int, _hash: u32) {
    forget_all();
}
