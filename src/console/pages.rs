//! The console's pages. maud escapes every interpolated value, so payloads,
//! headers and errors (attacker-controlled text) always render as text; the
//! only markup is what is written here. No inline script or style: the CSP
//! forbids both.

use crate::status::EventStatus;
use actix_web::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};

use super::{
    auth::{Auth, Principal},
    queries::{ActionRow, Bucket, NotificationRow, SourceHealth},
    FilterQuery, PAGE_SIZE,
};
use crate::ops::{
    events::{EventDetail, EventSummary, TimelineEntry},
    replay::ReplayReport,
};

/// Who is looking, and the CSRF token their forms carry.
pub struct View {
    pub name: String,
    pub operator: bool,
    pub csrf: String,
}

impl View {
    pub fn new(principal: &Principal, auth: &Auth) -> Self {
        Self {
            name: principal.name.clone(),
            operator: principal.is_operator(),
            csrf: principal.csrf(auth),
        }
    }

    fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }
}

fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn age(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

fn document(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · hookbox" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body { (body) }
        }
    }
}

fn layout(view: &View, title: &str, content: Markup) -> Markup {
    document(
        title,
        html! {
            header.top {
                a.brand href="/" { "hookbox" }
                nav {
                    a href="/" { "Overview" }
                    a href="/events" { "Events" }
                    a href="/actions" { "Actions" }
                }
                div.who {
                    span { (view.name) " · " (if view.operator { "operator" } else { "viewer" }) }
                    form method="post" action="/logout" {
                        (view.csrf_field())
                        button type="submit" { "Log out" }
                    }
                }
            }
            main { h1 { (title) } (content) }
        },
    )
}

pub fn login(error: Option<&str>) -> Markup {
    document(
        "Log in",
        html! {
            main.login {
                h1 { "hookbox console" }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action="/login" {
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
                p.hint { "Use a token named in the [console] section of the configuration." }
            }
        },
    )
}

pub fn error_page(status: StatusCode, message: &str) -> Markup {
    document(
        "Error",
        html! {
            main {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error { (message) }
                p { a href="/" { "Back to the overview" } }
            }
        },
    )
}

fn health(status: &SourceHealth) -> (&'static str, &'static str) {
    if status.dead > 0 {
        ("bad", "dead events")
    } else if status.oldest_due_seconds.unwrap_or(0.0) > 60.0 {
        ("warn", "falling behind")
    } else if status.retrying > 0 {
        ("warn", "retrying")
    } else {
        ("ok", "healthy")
    }
}

/// Pauses in force and circuits not closed, for the overview.
pub struct FlowState<'a> {
    pub pauses: &'a [crate::ops::flow::Pause],
    pub circuits: &'a [crate::ops::flow::CircuitState],
    pub handlers: &'a [String],
}

/// A pause or resume form for one source or handler.
fn pause_form(view: &View, kind: &str, name: &str, resume: bool) -> Markup {
    let (action, label, placeholder) = match resume {
        true => ("/resume", "Resume", "why resume"),
        false => ("/pause", "Pause", "why pause"),
    };
    html! {
        form.inline method="post" action=(action) {
            (view.csrf_field())
            input type="hidden" name="kind" value=(kind);
            input type="hidden" name="name" value=(name);
            input type="text" name="reason" required placeholder=(placeholder);
            button type="submit" { (label) }
        }
    }
}

pub fn overview(
    view: &View,
    sources: &[SourceHealth],
    hour: &[Bucket],
    day: &[Bucket],
    notifications: &[NotificationRow],
    flow: &FlowState<'_>,
) -> Markup {
    let paused =
        |kind: &str, name: &str| flow.pauses.iter().any(|p| p.kind == kind && p.name == name);
    layout(
        view,
        "Overview",
        html! {
            section {
                h2 { "Sources" }
                table #sources {
                    thead { tr {
                        th { "Source" } th { "Health" } th.n { "Pending" } th.n { "Processing" } th.n { "Retrying" }
                        th.n { "Dead" } th { "Oldest due" } th.n { "Deliveries 1h" } th.n { "Completed 1h" }
                        th.n { "Failed attempts 1h" } th { "Last delivery" }
                    } }
                    tbody {
                        @for s in sources {
                            @let (class, label) = health(s);
                            tr {
                                td { a href={ "/events?source=" (s.source) } { (s.source) } }
                                td { span class={ "badge " (class) } { (label) } }
                                td.n { (s.pending) } td.n { (s.processing) }
                                td.n { a href={ "/events?status=retrying&source=" (s.source) } { (s.retrying) } }
                                td.n { a href={ "/events?status=dead&source=" (s.source) } { (s.dead) } }
                                td { (s.oldest_due_seconds.map(age).unwrap_or_else(|| "—".into())) }
                                td.n { (s.deliveries_1h) } td.n { (s.completed_1h) } td.n { (s.failed_1h) }
                                td { (s.last_delivery_at.as_ref().map(time).unwrap_or_else(|| "never".into())) }
                            }
                        }
                    }
                }
            }
            section #flow {
                h2 { "Paused and circuits" }
                @if flow.pauses.is_empty() && flow.circuits.is_empty() {
                    p.empty { "Nothing is paused; every circuit is closed." }
                }
                @if !flow.pauses.is_empty() {
                    table #pauses {
                        thead { tr { th { "Paused" } th { "Since" } th { "By" } th { "Reason" } th { "" } } }
                        tbody {
                            @for p in flow.pauses {
                                tr {
                                    td { (p.kind) " " strong { (p.name) } }
                                    td { (time(&p.paused_at)) } td { (p.actor) } td { (p.reason) }
                                    td { @if view.operator { (pause_form(view, &p.kind, &p.name, true)) } }
                                }
                            }
                        }
                    }
                }
                @if !flow.circuits.is_empty() {
                    table #circuits {
                        thead { tr { th { "Handler" } th { "Circuit" } th.n { "Failures" } th { "Open until" } } }
                        tbody {
                            @for c in flow.circuits {
                                tr {
                                    td { (c.handler) } td { span class="badge bad" { (c.circuit) } }
                                    td.n { (c.failures) }
                                    td { (c.open_until.as_ref().map(time).unwrap_or_else(|| "—".into())) }
                                }
                            }
                        }
                    }
                }
                @if view.operator {
                    details {
                        summary { "Pause a source or a handler" }
                        @for s in sources {
                            @if !paused("source", &s.source) {
                                p { "source " strong { (s.source) } " " (pause_form(view, "source", &s.source, false)) }
                            }
                        }
                        @for h in flow.handlers {
                            @if !paused("handler", h) {
                                p { "handler " strong { (h) } " " (pause_form(view, "handler", h, false)) }
                            }
                        }
                    }
                }
            }
            section.charts {
                h2 { "Last hour (5-minute buckets)" }
                (chart(hour, "%H:%M"))
                h2 { "Last day (hourly)" }
                (chart(day, "%b %d %H:00"))
                p.legend {
                    span.deliveries { "deliveries" } " " span.completions { "completions" } " " span.failures { "failures" }
                }
            }
            section {
                h2 { "Recent alert notifications" }
                (notification_table(notifications))
            }
        },
    )
}

/// Three series as polylines in server-side SVG: no script, no inline style.
fn chart(buckets: &[Bucket], label: &str) -> Markup {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 140.0;
    let max = buckets
        .iter()
        .map(|b| b.deliveries.max(b.completions).max(b.failures))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let step = WIDTH / (buckets.len().max(2) - 1) as f64;
    let points = |value: fn(&Bucket) -> i64| {
        buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * step,
                    HEIGHT - value(b) as f64 / max * HEIGHT
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first = buckets
        .first()
        .map(|b| b.start.format(label).to_string())
        .unwrap_or_default();
    let last = buckets
        .last()
        .map(|b| b.start.format(label).to_string())
        .unwrap_or_default();
    html! {
        svg.chart viewBox="-40 -10 780 175" role="img" aria-label="throughput chart" xmlns="http://www.w3.org/2000/svg" {
            line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#999" {}
            line x1="0" y1="0" x2="0" y2=(HEIGHT) stroke="#999" {}
            text x="-6" y="8" text-anchor="end" font-size="11" fill="#555" { (max as i64) }
            text x="-6" y=(HEIGHT) text-anchor="end" font-size="11" fill="#555" { "0" }
            text x="0" y=(HEIGHT + 16.0) font-size="11" fill="#555" { (first) }
            text x=(WIDTH) y=(HEIGHT + 16.0) text-anchor="end" font-size="11" fill="#555" { (last) }
            polyline points=(points(|b| b.deliveries)) fill="none" stroke="#2563eb" stroke-width="2" {}
            polyline points=(points(|b| b.completions)) fill="none" stroke="#16a34a" stroke-width="2" {}
            polyline points=(points(|b| b.failures)) fill="none" stroke="#dc2626" stroke-width="2" {}
        }
    }
}

fn notification_table(notifications: &[NotificationRow]) -> Markup {
    html! {
        @if notifications.is_empty() {
            p.empty { "No alert has fired." }
        } @else {
            table #notifications {
                thead { tr { th { "At" } th { "Alert" } th { "Condition" } th { "Source" } th { "Counts" } th { "Outcome" } } }
                tbody {
                    @for n in notifications {
                        tr {
                            td { (time(&n.at)) } td { (n.alert) } td { code { (n.condition) } }
                            td { (n.source.as_deref().unwrap_or("all")) } td { code { (n.counts) } }
                            td {
                                span class={ "badge " (if n.outcome == "sent" { "ok" } else { "bad" }) } { (n.outcome) }
                                @if let Some(error) = &n.error { " " (error) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn filter_form(query: &FilterQuery, sources: &[String], action: &str, submit: &str) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let selected_status = value(&query.status);
    let selected_source = value(&query.source);
    html! {
        form.filters method="get" action=(action) {
            label { "Source "
                select name="source" {
                    option value="" { "any" }
                    @for s in sources { option value=(s) selected[*s == selected_source] { (s) } }
                }
            }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in EventStatus::ALL.iter().map(|s| s.as_str()) { option value=(s) selected[s == selected_status] { (s) } }
                }
            }
            label { "Type " input type="text" name="type" value=(value(&query.event_type)) placeholder="application.*"; }
            label { "Since " input type="text" name="since" value=(value(&query.since)) placeholder="6h or 2026-11-22T10:00:00Z"; }
            label { "Until " input type="text" name="until" value=(value(&query.until)); }
            @if action == "/events" {
                label.wide { "Payload " input type="text" name="q" value=(value(&query.q)) placeholder="uid = ABC or {\"event\":{\"type\":\"application.complete\"}}"; }
            }
            button type="submit" { (submit) }
        }
    }
}

fn event_rows(rows: &[EventSummary]) -> Markup {
    html! {
        table #events {
            thead { tr { th { "Received" } th { "Source" } th { "Type" } th { "Status" } th.n { "Attempts" } th { "Last error" } } }
            tbody {
                @for e in rows {
                    tr {
                        td { a href={ "/events/" (e.id) } { (time(&e.received_at)) } }
                        td { (e.source) }
                        td { (e.event_type.as_deref().unwrap_or("—")) }
                        td { span class={ "status " (e.status) } { (e.status) } }
                        td.n { (e.attempts) }
                        td.error { (e.last_error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

pub fn events(
    view: &View,
    sources: &[String],
    query: &FilterQuery,
    rows: &[EventSummary],
    more: bool,
) -> Markup {
    let filter = query.query_string();
    layout(
        view,
        "Events",
        html! {
            (filter_form(query, sources, "/events", "Filter"))
            @if rows.is_empty() {
                p.empty { "No event matches." }
            } @else {
                (event_rows(rows))
            }
            p.pager {
                @if query.before.is_some() { a href={ "/events" (filter) } { "Newest" } " " }
                @if more {
                    @if let Some(last) = rows.last() {
                        a #older href={ "/events" (filter) "&before=" (last.id) } { "Older " (PAGE_SIZE) " →" }
                    }
                }
            }
            @if view.operator {
                p { a href={ "/replay" (filter) } { "Replay events matching this filter…" } }
            }
        },
    )
}

fn pretty(text: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| text.to_owned()),
        Err(_) => text.to_owned(),
    }
}

pub fn event(
    view: &View,
    detail: &EventDetail,
    timeline: &[TimelineEntry],
    replayed: Option<i64>,
) -> Markup {
    layout(
        view,
        "Event",
        html! {
            @if let Some(n) = replayed { p.notice role="status" { "Replayed (" (n) "): the worker will run it again shortly." } }
            dl.facts {
                dt { "Id" } dd { code #event-id { (detail.id) } }
                dt { "Source" } dd { (detail.source) " (" (detail.environment) ")" }
                dt { "Key" } dd { code { (detail.event_key) } }
                dt { "Type" } dd { (detail.event_type.as_deref().unwrap_or("—")) }
                dt { "Status" } dd { span #status class={ "status " (detail.status) } { (detail.status) } }
                dt { "Attempts" } dd { (detail.attempts) }
                dt { "Received" } dd { (time(&detail.received_at)) }
                dt { "Next attempt" } dd { (time(&detail.next_attempt_at)) }
                @if let Some(at) = &detail.processed_at { dt { "Finished" } dd { (time(at)) } }
                @if let Some(error) = &detail.last_error { dt { "Last error" } dd.error { (error) } }
                dt { "SHA-256" } dd { code { (detail.payload_sha256) } }
            }
            @if view.operator {
                form #replay method="post" action={ "/events/" (detail.id) "/replay" } {
                    (view.csrf_field())
                    label { "Reason " input #reason type="text" name="reason" required placeholder="why run it again"; }
                    @if detail.status == EventStatus::Succeeded {
                        label { input type="checkbox" name="include_succeeded"; " its handler already succeeded: run it again" }
                    }
                    button #replay-button type="submit" { "Replay" }
                }
                @if matches!(detail.status, EventStatus::Pending | EventStatus::Retrying | EventStatus::Dead) {
                    form #skip method="post" action={ "/events/" (detail.id) "/skip" } {
                        (view.csrf_field())
                        label { "Reason " input #skip-reason type="text" name="reason" required placeholder="why end it unprocessed"; }
                        button #skip-button type="submit" { "Skip" }
                    }
                }
            }
            h2 { "Timeline" }
            table #timeline {
                thead { tr { th { "At" } th { "Kind" } th { "Outcome" } th { "Detail" } } }
                tbody {
                    @for entry in timeline {
                        tr class=(entry.kind) {
                            td { (time(&entry.at)) } td { (entry.kind) } td { (entry.outcome) } td { (entry.detail) }
                        }
                    }
                }
            }
            h2 { "Payload" }
            @match &detail.payload {
                Some(payload) => pre #payload { (pretty(payload)) },
                None => p.empty { "The payload was pruned; the key is kept so late duplicates are still recognised." },
            }
            h2 { "Headers" }
            @match &detail.headers {
                Some(headers) => pre #headers { (serde_json::to_string_pretty(headers).unwrap_or_default()) },
                None => p.empty { "None stored." },
            }
        },
    )
}

pub fn replay_preview(
    view: &View,
    query: &FilterQuery,
    preview: Result<(i64, &[EventSummary]), &str>,
) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    layout(
        view,
        "Replay by filter",
        html! {
            (filter_form(query, &[], "/replay", "Count"))
            @match preview {
                Err(message) => p.error { (message) },
                Ok((count, sample)) => {
                    p #would-replay { "Would replay " strong { (count) } " events." }
                    @if !sample.is_empty() { (event_rows(sample)) }
                    @if view.operator && count > 0 {
                        form #bulk-replay method="post" action="/replay" data-confirm={ "Replay " (count) " events?" } {
                            (view.csrf_field())
                            input type="hidden" name="source" value=(value(&query.source));
                            input type="hidden" name="status" value=(value(&query.status));
                            input type="hidden" name="type" value=(value(&query.event_type));
                            input type="hidden" name="since" value=(value(&query.since));
                            input type="hidden" name="until" value=(value(&query.until));
                            label { "Reason " input type="text" name="reason" required; }
                            button type="submit" { "Replay " (count) " events" }
                        }
                    }
                }
            }
        },
    )
}

pub fn replay_done(view: &View, report: &ReplayReport) -> Markup {
    layout(
        view,
        "Replay recorded",
        html! {
            p.notice role="status" {
                "Replayed " strong { (report.replayed) } " events"
                @if let Some(id) = report.action_id { " (action #" (id) ")" }
                ". The workers pick them up now."
            }
            p { a href="/actions" { "See the audit log" } }
        },
    )
}

pub fn actions(
    view: &View,
    rows: &[ActionRow],
    more: bool,
    notifications: &[NotificationRow],
) -> Markup {
    layout(
        view,
        "Actions",
        html! {
            table #actions {
                thead { tr { th { "#" } th { "At" } th { "Actor" } th { "Action" } th.n { "Affected" } th { "Reason" } th { "Filter" } } }
                tbody {
                    @for a in rows {
                        tr {
                            td { (a.id) } td { (time(&a.at)) } td { (a.actor) } td { (a.action) }
                            td.n { (a.affected) } td { (a.reason.as_deref().unwrap_or("")) } td { code { (a.filter) } }
                        }
                    }
                }
            }
            @if more { @if let Some(last) = rows.last() { p.pager { a href={ "/actions?before=" (last.id) } { "Older →" } } } }
            h2 { "Alert notifications" }
            (notification_table(notifications))
        },
    )
}
