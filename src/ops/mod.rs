//! What operators do: look at the inbox, replay, import, prune. The `hookbox`
//! command formats these; tests and tools call them directly.

pub mod events;
pub mod filter;
pub mod flow;
pub mod import;
pub mod prune;
pub mod replay;
pub mod status;

use sqlx::PgConnection;

/// Records an operator action; returns its id.
pub async fn record_action(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    filter: &serde_json::Value,
    reason: Option<&str>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO inbox_actions (actor, action, filter, reason) VALUES ($1, $2, $3, $4) RETURNING id",
        actor,
        action,
        filter,
        reason,
    )
    .fetch_one(conn)
    .await
}

pub async fn add_affected(
    conn: &mut PgConnection,
    action_id: i64,
    count: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE inbox_actions SET affected = affected + $2 WHERE id = $1",
        action_id,
        count
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The operating-system user, the default `--actor`.
pub fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions.
            format!("uid:{}", unsafe { libc::getuid() })
        })
}
