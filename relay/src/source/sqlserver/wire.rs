//! The tiberius implementation of `db::Db`: one TDS connection, driven by a current-thread
//! tokio runtime owned by the source (the pump is synchronous). The connection is opened on
//! first use and dropped after any failure, so that the next call connects again.

use super::db::{Db, Row, Value};
use super::Url;
use crate::source::{Result, SourceError};
use tiberius::{AuthMethod, Client, ColumnData, Config, EncryptionLevel, Query};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

pub struct Wire {
    config: Config,
    describe: String,
    runtime: Runtime,
    client: Option<Client<Compat<TcpStream>>>,
}

impl Wire {
    pub fn new(url: &Url) -> Result<Wire> {
        let mut config = Config::new();
        config.host(&url.host);
        config.port(url.port);
        config.database(&url.database);
        config.authentication(AuthMethod::sql_server(&url.user, &url.password));
        config.application_name("certyo-relay");
        config.encryption(if url.encrypt {
            EncryptionLevel::Required
        } else {
            EncryptionLevel::NotSupported
        });
        if url.trust_server_certificate {
            config.trust_cert();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| {
                SourceError(format!("cannot start the SQL Server client's runtime: {e}"))
            })?;
        Ok(Wire {
            config,
            describe: url.describe(),
            runtime,
            client: None,
        })
    }

    async fn open(config: Config, describe: &str) -> Result<Client<Compat<TcpStream>>> {
        let failed = |e: &dyn std::fmt::Display| {
            SourceError(format!(
                "cannot connect to {describe}: {e}; check the URL, the network and that the login may connect \
                 (add ?trust_server_certificate=true for a self-signed certificate)"
            ))
        };
        let tcp = TcpStream::connect(config.get_addr())
            .await
            .map_err(|e| failed(&e))?;
        let _ = tcp.set_nodelay(true);
        match Client::connect(config.clone(), tcp.compat_write()).await {
            Ok(client) => Ok(client),
            // Azure SQL's gateway may redirect to the database's node: follow it once.
            Err(tiberius::error::Error::Routing { host, port }) => {
                let mut config = config;
                config.host(&host);
                config.port(port);
                let tcp = TcpStream::connect(config.get_addr())
                    .await
                    .map_err(|e| failed(&e))?;
                let _ = tcp.set_nodelay(true);
                Client::connect(config, tcp.compat_write())
                    .await
                    .map_err(|e| failed(&e))
            }
            Err(e) => Err(failed(&e)),
        }
    }
}

fn cell(data: ColumnData<'static>) -> std::result::Result<Value, String> {
    Ok(match data {
        ColumnData::U8(v) => Value::Int(v.map(i64::from)),
        ColumnData::I16(v) => Value::Int(v.map(i64::from)),
        ColumnData::I32(v) => Value::Int(v.map(i64::from)),
        ColumnData::I64(v) => Value::Int(v),
        ColumnData::Bit(v) => Value::Bool(v),
        ColumnData::String(v) => Value::Text(v.map(|s| s.into_owned())),
        ColumnData::Binary(v) => Value::Bin(v.map(|b| b.into_owned())),
        ColumnData::Numeric(v) => Value::Text(v.map(|n| n.to_string())),
        ColumnData::Guid(v) => Value::Text(v.map(|g| g.to_string())),
        other => return Err(format!("a column of an unexpected type ({other:?})")),
    })
}

impl Db for Wire {
    fn query(&mut self, sql: &'static str, params: &[Value]) -> Result<Vec<Row>> {
        let Wire {
            config,
            describe,
            runtime,
            client,
        } = self;
        let result: Result<Vec<Row>> = runtime.block_on(async {
            if client.is_none() {
                *client = Some(Wire::open(config.clone(), describe).await?);
            }
            let Some(conn) = client.as_mut() else {
                return Err(SourceError(format!("{describe}: not connected")));
            };
            let failed = |e: tiberius::error::Error| SourceError(format!("{describe}: {e}"));
            // Without parameters as a plain batch: transaction statements must not run inside
            // sp_executesql (it refuses to return with a transaction opened or closed).
            let rows = if params.is_empty() {
                conn.simple_query(sql)
                    .await
                    .map_err(failed)?
                    .into_first_result()
                    .await
                    .map_err(failed)?
            } else {
                let mut query = Query::new(sql);
                for param in params {
                    match param {
                        Value::Int(v) => query.bind(*v),
                        Value::Text(v) => query.bind(v.clone()),
                        Value::Bin(v) => query.bind(v.clone()),
                        Value::Bool(v) => query.bind(*v),
                    }
                }
                query
                    .query(conn)
                    .await
                    .map_err(failed)?
                    .into_first_result()
                    .await
                    .map_err(failed)?
            };
            rows.into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(cell)
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| {
                            SourceError(format!("{describe}: {e} in the answer to a statement"))
                        })
                })
                .collect()
        });
        if result.is_err() {
            // A failed statement may leave the session in any state: start afresh next time.
            self.client = None;
        }
        result
    }
}
