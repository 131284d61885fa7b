//! The worker's errors.

/// What stops the worker from starting or from recording outcomes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or could not be reached; work not recorded is
    /// retried once its lease expires.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A `kind = "library"` handler that the embedding binary does not provide.
    #[error(
        "[handler.{name}] is kind = \"library\" but this binary provides no handler of that name"
    )]
    MissingLibraryHandler {
        /// The `[handler.NAME]` table's name.
        name: String,
    },
    /// A built-in handler could not be set up (for example its HTTP client).
    #[error("[handler.{name}] cannot be set up")]
    HandlerSetup {
        /// The `[handler.NAME]` table's name.
        name: String,
        /// Why it cannot.
        #[source]
        source: reqwest::Error,
    },
    /// A broker handler whose settings were not checked at load (a `Config`
    /// built by hand).
    #[error("[handler.{name}] has no checked broker settings")]
    MissingBrokerSettings {
        /// The `[handler.NAME]` table's name.
        name: String,
    },
    /// The worker stopped while work waited for a slot.
    #[error("the worker has stopped")]
    Stopped,
}

/// The worker's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
