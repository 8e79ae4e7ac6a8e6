//! Server functions that never raise an error, declared without pgrx's guard. The guard (a
//! `sigsetjmp` and a thread check) costs about 140 instructions a call, and these are called
//! for every captured row. Only functions that can neither `ereport` nor allocate belong here:
//! an error raised through an unguarded call would unwind Rust frames the wrong way.

use pgrx::pg_sys::{Datum, HeapTuple, TimestampTz, TransactionId, TupleDesc};

unsafe extern "C" {
    pub fn GetCurrentTransactionStartTimestamp() -> TimestampTz;
    pub fn GetCurrentTransactionIdIfAny() -> TransactionId;
    /// Reads the tuple into the caller's arrays; allocates nothing.
    pub fn heap_deform_tuple(
        tuple: HeapTuple,
        tupdesc: TupleDesc,
        values: *mut Datum,
        isnull: *mut bool,
    );
    pub fn heap_freetuple(tuple: HeapTuple);
    pub fn pfree(pointer: *mut std::ffi::c_void);
}
