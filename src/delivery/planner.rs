//! The worker analyzes its own tables: they change faster than autovacuum re-analyzes them.

use super::SpiResult;

/// The worker's tables grow and shrink by tens of thousands of rows within seconds, far faster
/// than autovacuum re-analyzes them; with stale statistics the planner hashes whole tables
/// where a thousand index probes would do (measured: 4x slower passes). So the worker
/// analyzes a table itself once it has added more than a fifth of what the last analysis saw
/// (at least `ANALYZE_AFTER` rows): a bounded sample, amortized over the rows added.
#[derive(Debug, Default)]
pub struct Planner {
    /// Per table: rows added since its last ANALYZE, and the row count that ANALYZE saw.
    tables: [(i64, f64); 2],
}

#[derive(Debug, Clone, Copy)]
pub enum Table {
    Delivery,
    Receipt,
}

const ANALYZE_AFTER: i64 = 5_000;

impl Planner {
    pub fn refresh(
        &mut self,
        client: &mut pgrx::spi::SpiClient<'_>,
        table: Table,
        added: i64,
    ) -> SpiResult<()> {
        // Only the columns the worker's statements filter, join and sort on: the planner needs
        // the row count (which any ANALYZE sets) and these columns' distributions; the others
        // (payload hashes, keys, texts) made the pass that analyzed take twice as long
        // (50k receipts: 10-14 ms with every column, 5 ms with these). Autovacuum's own
        // ANALYZE still covers every column for users' queries.
        let (name, columns, slot) = match table {
            Table::Delivery => (
                "certyo.delivery",
                "(id, relid, record_id, state, next_attempt_at)",
                &mut self.tables[0],
            ),
            Table::Receipt => (
                "certyo.receipt",
                "(id, relid, record_id, operation, accepted_at, anchor_status, next_verify_at, written_back)",
                &mut self.tables[1],
            ),
        };
        slot.0 += added;
        if (slot.0 as f64) < (ANALYZE_AFTER as f64).max(slot.1 * 0.2) {
            return Ok(());
        }
        // The planner needs row counts and rough distributions, not fine histograms: a small
        // sample keeps this pause short (with the default target it took ~170 ms on 100k rows).
        client.update("SET LOCAL default_statistics_target = 10", None, &[])?;
        client.update(&format!("ANALYZE {name} {columns}"), None, &[])?;
        let seen = client
            .select(
                "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::regclass",
                None,
                &[name.into()],
            )?
            .first()
            .get_one::<f64>()?
            .unwrap_or(0.0);
        *slot = (0, seen.max(0.0));
        Ok(())
    }
}
