//! The wire-independent database interface: one call per statement of `statements.rs`, with
//! positional parameters and rows of plain values. `wire::Wire` sends them over TDS
//! (tiberius); the tests' `fake::Fake` answers them from in-memory tables.

use super::super::{Result, SourceError};

/// A parameter or a column value. Every statement converts what it returns to these (times
/// to text), so no other type crosses the boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bin(Option<Vec<u8>>),
    Bool(Option<bool>),
}

pub type Row = Vec<Value>;

pub trait Db: Send {
    /// Run one statement of `statements.rs`; the rows of its first result set (none for a
    /// statement without one).
    fn query(&mut self, sql: &'static str, params: &[Value]) -> Result<Vec<Row>>;
}

impl Value {
    pub fn int(v: i64) -> Value {
        Value::Int(Some(v))
    }
    pub fn text(v: &str) -> Value {
        Value::Text(Some(v.to_string()))
    }
    pub fn opt_text(v: Option<&str>) -> Value {
        Value::Text(v.map(str::to_string))
    }
    pub fn bool(v: bool) -> Value {
        Value::Bool(Some(v))
    }
}

/// Typed access to a row's columns, naming the statement's column in errors.
pub struct Cols<'a> {
    pub row: &'a [Value],
    pub what: &'static str,
}

impl Cols<'_> {
    fn get(&self, i: usize) -> Result<&Value> {
        self.row.get(i).ok_or_else(|| {
            SourceError(format!(
                "SQL Server: {} returned too few columns; re-run the companion scripts of this version (sql/sqlserver/)",
                self.what
            ))
        })
    }

    fn wrong(&self, i: usize, want: &str) -> SourceError {
        SourceError(format!(
            "SQL Server: column {} of {} is not {want}; re-run the companion scripts of this version (sql/sqlserver/)",
            i + 1,
            self.what
        ))
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.get(i)? {
            Value::Int(v) => Ok(*v),
            Value::Bool(v) => Ok(v.map(i64::from)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64> {
        self.opt_i64(i)?
            .ok_or_else(|| self.wrong(i, "a non-NULL integer"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.get(i)? {
            Value::Text(v) => Ok(v.clone()),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| self.wrong(i, "non-NULL text"))
    }

    pub fn opt_bin(&self, i: usize) -> Result<Option<Vec<u8>>> {
        match self.get(i)? {
            Value::Bin(v) => Ok(v.clone()),
            _ => Err(self.wrong(i, "binary")),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.i64(i)? != 0)
    }
}

/// Run `work` in one transaction: committed if it succeeds, rolled back (best effort: the
/// original error is what matters) if not.
pub fn transaction<T>(db: &mut dyn Db, work: impl FnOnce(&mut dyn Db) -> Result<T>) -> Result<T> {
    db.query(super::statements::BEGIN, &[])?;
    match work(db) {
        Ok(value) => {
            if let Err(e) = db.query(super::statements::COMMIT, &[]) {
                let _ = db.query(super::statements::ROLLBACK, &[]);
                return Err(e);
            }
            Ok(value)
        }
        Err(e) => {
            let _ = db.query(super::statements::ROLLBACK, &[]);
            Err(e)
        }
    }
}
