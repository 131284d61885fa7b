//! `hookbox loadtest`: signed, realistic load against a deployment.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::CommonArgs;
use crate::{duration::HumanDuration, signature::Scheme};

#[derive(Args, Debug)]
pub struct LoadtestArgs {
    /// The `[[source]]` whose scheme and first secret sign the events.
    #[arg(long)]
    pub source: String,
    /// Where to POST, e.g. https://hooks.example.com/webhooks/begini.
    #[arg(long)]
    pub url: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run.
    #[arg(long, default_value = "30s")]
    pub duration: HumanDuration,
    /// Requests per second in all (open loop); omitted: each connection sends
    /// as soon as its previous answer arrives (closed loop).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Share of deliveries that repeat an event already sent (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
    /// Write `event_id,acknowledged_at_unix_micros` for every 200 to this CSV
    /// file, to measure what happens after the acknowledgement.
    #[arg(long, value_name = "PATH")]
    pub acks: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub requests: u64,
    pub throughput_per_second: f64,
    /// Answers by HTTP status; "error" for connection errors and timeouts.
    pub statuses: BTreeMap<String, u64>,
    pub latency_ms: Latency,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

struct Shared {
    histogram: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
    /// Recent bodies, to repeat as duplicates.
    sent: Vec<Vec<u8>>,
    /// (event id, wall-clock microseconds) of each 200, when `--acks` asks.
    acks: Option<Vec<(String, i64)>>,
}

pub async fn run(common: &CommonArgs, args: LoadtestArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.duplicates),
        "--duplicates is a share between 0.0 and 1.0"
    );
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let config = common.load_config()?;
    let source = config.require_source(&args.source)?.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let shared = Arc::new(Mutex::new(Shared {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        statuses: BTreeMap::new(),
        sent: Vec::new(),
        acks: args.acks.as_ref().map(|_| Vec::new()),
    }));
    let started = Instant::now();
    let deadline = started + args.duration.0;
    // Open loop: each connection keeps its share of the rate, late or not.
    let period = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.connections as f64 / f64::from(rate.max(1))));
    let tasks: Vec<_> = (0..args.connections)
        .map(|lane| {
            let (client, shared, source, url) = (
                client.clone(),
                shared.clone(),
                source.clone(),
                args.url.clone(),
            );
            let duplicates = args.duplicates;
            tokio::spawn(async move {
                let mut ticker = period.map(|p| {
                    let mut interval = tokio::time::interval_at(
                        tokio::time::Instant::now() + p.mul_f64(lane as f64 / 64.0),
                        p,
                    );
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    interval
                });
                while Instant::now() < deadline {
                    if let Some(ticker) = ticker.as_mut() {
                        ticker.tick().await;
                    }
                    let body = next_body(&shared, duplicates, &source.scheme);
                    let now = chrono::Utc::now().timestamp();
                    let message_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
                    let signature = source.scheme.sign(&source.keys[0], &body, now, &message_id);
                    let mut request = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body);
                    for (name, value) in signature {
                        request = request.header(name, value);
                    }
                    let sent_at = Instant::now();
                    let outcome = request.send().await;
                    let took = sent_at.elapsed();
                    let status = match &outcome {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(_) => "error".to_owned(),
                    };
                    let mut acknowledged = None;
                    if let Ok(response) = outcome {
                        let ok = response.status().is_success();
                        let body = response.bytes().await.unwrap_or_default();
                        if ok {
                            let at = chrono::Utc::now().timestamp_micros();
                            acknowledged = serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v["event_id"].as_str().map(|id| (id.to_owned(), at)));
                        }
                    }
                    let mut shared = shared.lock().expect("not poisoned");
                    if let (Some(acks), Some(ack)) = (shared.acks.as_mut(), acknowledged) {
                        acks.push(ack);
                    }
                    let _ = shared.histogram.record(took.as_micros().max(1) as u64);
                    *shared.statuses.entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let shared = shared.lock().expect("not poisoned");
    if let (Some(path), Some(acks)) = (&args.acks, &shared.acks) {
        let lines: String = acks.iter().map(|(id, at)| format!("{id},{at}\n")).collect();
        std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let h = &shared.histogram;
    let ms = |us: u64| us as f64 / 1000.0;
    let report = Report {
        seconds,
        requests: h.len(),
        throughput_per_second: h.len() as f64 / seconds,
        statuses: shared.statuses.clone(),
        latency_ms: Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} requests in {:.1}s: {:.0}/s",
            report.requests, report.seconds, report.throughput_per_second
        );
        let statuses: Vec<String> = report
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        println!("statuses: {}", statuses.join(", "));
        let l = &report.latency_ms;
        println!(
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p99_9, l.max
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A new event (about 1 KB, Begini's envelope) or, with probability
/// `duplicates`, one already sent. The event is made outside the lock, and
/// remembered only when duplicates are asked for: the generator's own work
/// shares the machine with what it measures.
fn next_body(shared: &Mutex<Shared>, duplicates: f64, scheme: &Scheme) -> Vec<u8> {
    if duplicates > 0.0 && rand::random::<f64>() < duplicates {
        let shared = shared.lock().expect("not poisoned");
        if !shared.sent.is_empty() {
            let pick = rand::random_range(0..shared.sent.len());
            return shared.sent[pick].clone();
        }
    }
    let body = realistic_event(scheme);
    if duplicates > 0.0 {
        let mut shared = shared.lock().expect("not poisoned");
        if shared.sent.len() < 10_000 {
            shared.sent.push(body.clone());
        } else {
            let slot = rand::random_range(0..shared.sent.len());
            shared.sent[slot] = body.clone();
        }
    }
    body
}

fn realistic_event(scheme: &Scheme) -> Vec<u8> {
    let uid = uuid::Uuid::now_v7().to_string().to_uppercase();
    let value = match scheme {
        Scheme::Begini => serde_json::json!({
            "uid": uid,
            "integration_id": "40417538227164719835",
            "event": {
                "type": "psychometric_score.complete",
                "details": {
                    "scored_at": chrono::Utc::now().timestamp(),
                    "score": rand::random_range(300..850),
                    "model": "psychometric-v7.3",
                    "segments": {"conscientiousness": 0.71, "impulsivity": 0.22, "financial_literacy": 0.64, "trust": 0.58},
                    "device": {"platform": "android", "os_version": "14", "app_version": "5.12.0", "locale": "es_MX"},
                    "session": {"started_at": chrono::Utc::now().timestamp() - 900, "duration_seconds": 842, "questions": 48},
                    "response_times_ms": (0..48).map(|_| rand::random_range(800..9000)).collect::<Vec<u32>>(),
                    "features": {"consistency_index": 0.83, "straightlining": 0.04, "completion_ratio": 1.0,
                                 "revision_rate": 0.12, "median_latency_ms": 3120, "night_session": false}
                },
                "reasons": ["completed_assessment", "sufficient_data", "consistent_responses", "device_verified"]
            }
        }),
        _ => serde_json::json!({
            "id": format!("evt_{}", uuid::Uuid::now_v7().simple()),
            "type": "invoice.paid",
            "created": chrono::Utc::now().timestamp(),
            "data": {"object": {"id": format!("in_{}", uuid::Uuid::now_v7().simple()), "amount_paid": 129900, "currency": "usd",
                     "customer": "cus_loadtest", "lines": [{"description": "Pro plan", "amount": 129900, "quantity": 1}],
                     "metadata": {"region": "us-east", "channel": "web", "campaign": "spring"}}}
        }),
    };
    serde_json::to_vec(&value).expect("JSON serialises")
}
