//! The receiver when the database is away, and migrations run concurrently.

use std::time::{Duration, Instant};

use hookbox::pgcluster::StopMode;
use sqlx::Connection;

use crate::support::*;

#[tokio::test]
async fn with_the_database_stopped_deliveries_get_503_quickly_and_200_once_it_returns() {
    // A private cluster of its own: stopping it disturbs no other test.
    let (cluster, url) = private_cluster(None).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let app = TestApp::spawn_on(
        TestDb {
            url: url.clone(),
            pool,
        },
        BEGINI_CONFIG,
        &[("BEGINI_API_KEY", BEGINI_KEY)],
    )
    .await;
    assert_eq!(
        app.post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete")
        )
        .await
        .status,
        200
    );

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(StopMode::Immediate).unwrap();
        cluster
    })
    .await
    .unwrap();
    let during = begini_payload(&unique_uid(), "application.complete");
    let started = Instant::now();
    let answer = app.post_signed("begini", &during).await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.body,
        serde_json::json!({"detail": "Service Unavailable"})
    );
    assert!(answer.headers.contains_key("retry-after"));
    // request_timeout is 2s; the bound here is generous on purpose (no timing target).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered without hanging"
    );
    let ready = app.readiness().await;
    assert_eq!(ready, 503);

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(false).unwrap();
        cluster
    })
    .await
    .unwrap();
    let status = app.deliver_as_sender("begini", &during).await.status;
    assert_eq!(status, 200, "the receiver recovered without a restart");
    let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_events")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(events, 2, "nothing half-written during the outage");
    drop(cluster);
}

#[tokio::test]
async fn migrating_twice_and_from_several_processes_at_once_is_safe() {
    let db = database().await;
    let runs = (0..4).map(|_| hookbox::db::migrate(&db.url));
    for report in futures_util::future::join_all(runs).await {
        assert!(report.unwrap().applied.is_empty(), "already migrated");
    }
    let fresh = format!("hookbox_fresh_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {fresh}"))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    url.set_path(&fresh);
    let url = url.to_string();
    let runs = (0..4).map(|_| hookbox::db::migrate(&url));
    let applied: usize = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.unwrap().applied.len())
        .sum();
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(
        applied, migrations,
        "each migration applied exactly once, by one process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_reconnects_by_itself_after_a_database_restart() {
    let (cluster, url) = private_cluster(None).await;
    let text = format!(
        "{BEGINI_CONFIG}\n[worker]\npoll_interval = \"500ms\"\n[[route]]\nsource = \"begini\"\nhandler = \"h\"\n\
         [handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n"
    );
    let config = config(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(&url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    let worker = hookbox::worker::Worker::from_config(&config, pool, Default::default()).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let app = TestApp::spawn_on(
        TestDb {
            url: url.clone(),
            pool: sqlx::PgPool::connect(&url).await.unwrap(),
        },
        BEGINI_CONFIG,
        &[("BEGINI_API_KEY", BEGINI_KEY)],
    )
    .await;

    let succeeded = |app: &TestApp| {
        let pool = app.db.pool.clone();
        async move {
            for _ in 0..100 {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM inbox_events WHERE status = 'succeeded'",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                if n > 0 {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            0
        }
    };
    assert_eq!(
        app.post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete")
        )
        .await
        .status,
        200
    );
    assert_eq!(succeeded(&app).await, 1);

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(StopMode::Immediate).unwrap();
        cluster.restart(false).unwrap();
        cluster
    })
    .await
    .unwrap();
    let status = app
        .deliver_as_sender(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await
        .status;
    assert_eq!(status, 200);
    let mut done = 0;
    for _ in 0..100 {
        done = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM inbox_events WHERE status = 'succeeded'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap_or(0);
        if done == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        done, 2,
        "the worker processed an event stored after the restart"
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();
    drop(cluster);
}
