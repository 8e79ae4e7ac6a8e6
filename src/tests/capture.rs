#[pgrx::pg_schema]
mod t {}
