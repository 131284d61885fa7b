//! `hookbox-worker`: processes stored events until SIGTERM or Ctrl-C, then
//! stops gracefully.

use std::process::ExitCode;

use crate::{
    db::PoolSettings,
    worker::{self, LibraryHandlers, Worker},
};

pub fn main() -> ExitCode {
    super::process::serve(
        "hookbox-worker",
        "Process stored webhook events",
        crate::config::ProcessRole::Worker,
        PoolSettings::worker,
        |config, pool, shutdown| async move {
            let worker = Worker::from_config(&config, pool.clone(), LibraryHandlers::default())?;
            // Scheduled reconciliation runs beside the worker; the database
            // elects one worker per source and period.
            tokio::spawn(crate::reconcile::run_scheduled(
                config.clone(),
                pool,
                worker.id().to_owned(),
                shutdown.clone(),
            ));
            // So do alerts: one evaluator at a time, elected through the database.
            crate::alerts::spawn_evaluator(&config, &shutdown);
            worker::run(&config, worker, shutdown).await
        },
    )
}
