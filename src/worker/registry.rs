//! The worker's handlers, built once from the `[handler.NAME]` tables.

use std::{collections::HashMap, sync::Arc};

use super::{handlers, Error, ExternalHandler, Handler};
use crate::config::{HandlerConfig, HandlerSection};

/// How a handler's effects are completed.
pub(super) enum Runner {
    /// In the completion transaction: exactly-once effects.
    InTransaction(Arc<dyn Handler>),
    /// Outside it, before the outcome is recorded: at-least-once.
    External(Arc<dyn ExternalHandler>),
}

/// Handlers provided in code by a binary that embeds hookbox, by the name its
/// `[handler.NAME]` table (`kind = "library"`) gives them.
///
/// ```
/// use hookbox::{async_trait, Event, Handler, HandlerError, LibraryHandlers};
///
/// struct Audit;
///
/// #[async_trait]
/// impl Handler for Audit {
///     async fn handle(
///         &self,
///         event: &Event,
///         transaction: &mut sqlx::PgConnection,
///     ) -> Result<(), HandlerError> {
///         sqlx::query("INSERT INTO audit (event_id) VALUES ($1)")
///             .bind(event.id)
///             .execute(transaction)
///             .await
///             .map_err(|e| HandlerError::retryable(e.to_string()))?;
///         Ok(())
///     }
/// }
///
/// let handlers = LibraryHandlers::default().with("audit", Audit);
/// ```
#[derive(Default)]
pub struct LibraryHandlers(HashMap<String, Arc<dyn Handler>>);

impl LibraryHandlers {
    /// Provides the handler that `[handler.NAME] kind = "library"` names.
    pub fn with(mut self, name: &str, handler: impl Handler + 'static) -> Self {
        self.0.insert(name.to_owned(), Arc::new(handler));
        self
    }
}

/// Builds every configured handler; a library handler the binary does not
/// provide is an error at start, not at the first event.
pub(super) fn build(
    configured: &std::collections::BTreeMap<String, HandlerConfig>,
    mut library: LibraryHandlers,
) -> Result<HashMap<String, Runner>, Error> {
    let mut runners = HashMap::new();
    for (name, handler) in configured {
        let runner = match &handler.section {
            HandlerSection::Sql { statement } => {
                Runner::InTransaction(Arc::new(handlers::sql::SqlHandler::new(statement)))
            }
            HandlerSection::Http {
                url,
                timeout,
                permanent_statuses,
                ..
            } => Runner::External(Arc::new(
                handlers::http::HttpHandler::new(
                    url,
                    timeout.0,
                    permanent_statuses,
                    handler.signing_key.clone(),
                )
                .map_err(|source| Error::HandlerSetup {
                    name: name.clone(),
                    source,
                })?,
            )),
            HandlerSection::Exec {
                command,
                timeout,
                env,
            } => Runner::External(Arc::new(
                handlers::exec::ExecHandler::new(command, timeout.0).passing(env),
            )),
            HandlerSection::Nats(_) | HandlerSection::Amqp(_) | HandlerSection::Redis(_) => {
                let broker = handler
                    .broker
                    .as_ref()
                    .ok_or_else(|| Error::MissingBrokerSettings { name: name.clone() })?;
                Runner::External(handlers::broker::build(broker))
            }
            HandlerSection::Library {} => Runner::InTransaction(
                library
                    .0
                    .remove(name)
                    .ok_or_else(|| Error::MissingLibraryHandler { name: name.clone() })?,
            ),
        };
        runners.insert(name.clone(), runner);
    }
    Ok(runners)
}
