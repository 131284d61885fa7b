//! Benchmark: one `reconcile` run over a Stripe-like listing of EVENTS events
//! (pages of 100) of which 10% are missing from the inbox, then a second run
//! that finds nothing missing.
//!
//! `cargo build --examples && target/debug/examples/reconcile_scale [EVENTS]`
//! Uses DATABASE_URL's server if set (in a new database), else a private
//! cluster (fsync on). The listing is served from memory on 127.0.0.1.

use std::{collections::BTreeMap, net::TcpListener, path::Path};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use hookbox::{
    config::Config,
    ops::import::{import_payloads, ImportReport, ImportTarget},
    pgcluster::Server,
    reconcile::{reconcile, ReconcileRequest},
};
use tokio::time::Instant;

/// Newest first, as Stripe lists them; each pre-serialised.
struct Listing(Vec<(String, serde_json::Value)>);

async fn list(request: HttpRequest, listing: web::Data<Listing>) -> HttpResponse {
    let query: BTreeMap<String, String> = url_pairs(request.query_string()).into_iter().collect();
    let start = query.get("starting_after").map_or(0, |after| {
        listing
            .0
            .iter()
            .position(|(id, _)| id == after)
            .map_or(listing.0.len(), |p| p + 1)
    });
    let page: Vec<&serde_json::Value> = listing.0[start..]
        .iter()
        .take(100)
        .map(|(_, e)| e)
        .collect();
    let has_more = start + page.len() < listing.0.len();
    HttpResponse::Ok().content_type("application/json").body(
        serde_json::to_string_pretty(&serde_json::json!({
            "object": "list", "data": page, "has_more": has_more, "url": "/v1/events"
        }))
        .unwrap(),
    )
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let now = chrono::Utc::now().timestamp();
    let listed: Vec<(String, serde_json::Value)> = (0..events)
        .rev()
        .map(|n| {
            let id = format!("evt_bench{n:08}");
            let event = serde_json::json!({
                "id": id, "object": "event", "api_version": "2024-06-20",
                "created": now - 3000 + (n * 3000 / events) as i64,
                "data": { "object": { "id": format!("pi_{n:08}"), "object": "payment_intent", "amount": n } },
                "livemode": false, "pending_webhooks": 0, "type": "payment_intent.succeeded"
            });
            (id, event)
        })
        .collect();
    let delivered: Vec<(u64, Vec<u8>)> = listed
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(i, (_, event))| (i as u64, serde_json::to_vec(event).unwrap()))
        .collect();

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let api_base = format!("http://{}", listener.local_addr()?);
    let data = web::Data::new(Listing(listed));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/v1/events", web::get().to(list))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    tokio::spawn(server);

    let text = format!(
        "[[source]]\nname = \"stripe\"\nenvironment = \"sandbox\"\nscheme = \"stripe\"\n\
         secrets_env = [\"WHSEC\"]\nevent_key = {{ json = [\"/id\"] }}\n\
         [source.reconcile]\nkind = \"stripe\"\napi_key_env = \"KEY\"\napi_base = \"{api_base}\"\n"
    );
    let env: BTreeMap<String, String> = [
        ("WHSEC", "whsec_bench-webhook-secret-0001"),
        ("KEY", "sk_test_bench"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = Config::parse(&text, Path::new("bench.toml"), &env)?;
    let source = config.source("stripe").unwrap();

    let server = Server::from_env_or_private(true)?;
    let url = server.create_database("hookbox_bench").await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let mut seed = ImportTarget::Action(
        hookbox::ops::record_action(
            &mut *pool.acquire().await?,
            "bench",
            "import",
            &serde_json::json!({}),
            None,
        )
        .await?,
    );
    let mut seeded = ImportReport::default();
    for chunk in delivered.chunks(500) {
        import_payloads(&pool, source, &mut seed, chunk, &mut seeded).await?;
    }
    println!("stored {} of {events} events beforehand", seeded.stored);

    let request = ReconcileRequest {
        since: None,
        dry_run: false,
        actor: "bench".into(),
        reason: None,
    };
    for run in ["first run", "second run"] {
        let started = Instant::now();
        let report = reconcile(&pool, source, &request).await?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{run}: listed {} in {} pages, {} already stored, imported {} in {seconds:.2}s ({:.0} listed events/s)",
            report.listed,
            report.pages,
            report.already_stored,
            report.imported,
            report.listed as f64 / seconds
        );
    }
    Ok(())
}
