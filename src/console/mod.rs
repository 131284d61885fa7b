//! `hookbox console`: a web console over the inbox's tables. Pages are HTML
//! rendered on the server (maud escapes every value it interpolates: payloads
//! are attacker-controlled text), styles and one small script are embedded in
//! the binary, and every response carries a strict Content-Security-Policy.
//!
//! Operator actions call the same `ops` functions as the `hookbox` command.
//! Each action is one route and one handler that checks
//! `Principal::authorize_change` before it writes: pause, resume and skip
//! join `POST /events/{id}/replay` and `POST /replay` the same way.

pub mod auth;
mod pages;
pub mod queries;

use std::{net::TcpListener, str::FromStr, time::Duration};

use actix_web::{
    dev::Server,
    http::{header, StatusCode},
    middleware::DefaultHeaders,
    web, App, HttpRequest, HttpResponse, HttpServer, ResponseError,
};
use anyhow::Context;
use serde::Deserialize;
use sqlx::{postgres::PgConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::auth::{Auth, Principal, Refusal};
use crate::{
    config::{Config, ConsoleConfig},
    ops::{
        self,
        events::EventReference,
        filter::{parse_status, parse_time, EventFilter},
        flow::{FlowError, PauseTarget},
        replay::{ReplayError, ReplayRequest},
    },
};

/// Events per page.
pub const PAGE_SIZE: i64 = 50;

/// No inline script or style, no framing, forms post only here.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLES: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");

/// The console's database connections: a statement never runs longer than
/// `statement_timeout` (a payload search over millions of rows gives up
/// rather than load the database), and every statement gets a plan for its
/// own parameters (the optional filters are `$n IS NULL OR …`).
pub fn pool(url: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("the database URL is not a valid postgres:// URL")?
        .application_name("hookbox-console")
        .options([
            ("statement_timeout", "10s"),
            ("plan_cache_mode", "force_custom_plan"),
        ]);
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

pub struct State {
    pub pool: PgPool,
    pub sources: Vec<String>,
    /// The configured handlers, which an operator may pause.
    pub handlers: Vec<String>,
}

/// A bound, not yet running console.
pub struct Console {
    server: Server,
    port: u16,
}

impl Console {
    pub fn build(config: &Config, pool: PgPool) -> anyhow::Result<Self> {
        let console = console_config(config)?;
        let listener = TcpListener::bind(console.listen)
            .with_context(|| format!("cannot listen on {} (console.listen)", console.listen))?;
        let port = listener.local_addr()?.port();
        let auth = web::Data::new(Auth::new(console));
        let state = web::Data::new(State {
            pool,
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            handlers: config.handlers.keys().cloned().collect(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(auth.clone())
                .app_data(state.clone())
                .app_data(web::FormConfig::default().limit(64 * 1024))
                .app_data(web::JsonConfig::default().limit(64 * 1024))
                .wrap(
                    DefaultHeaders::new()
                        .add((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
                        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                        .add((header::X_FRAME_OPTIONS, "DENY"))
                        .add((header::REFERRER_POLICY, "no-referrer"))
                        .add((header::CACHE_CONTROL, "no-store")),
                )
                .route("/login", web::get().to(login_form))
                .route("/login", web::post().to(login))
                .route("/logout", web::post().to(logout))
                .route("/static/console.css", web::get().to(styles))
                .route("/static/console.js", web::get().to(script))
                .route("/", web::get().to(overview))
                .route("/events", web::get().to(events))
                .route("/events/{id}", web::get().to(event))
                .route("/events/{id}/replay", web::post().to(replay_one))
                .route("/events/{id}/skip", web::post().to(skip_one))
                .route("/pause", web::post().to(change_pause))
                .route("/resume", web::post().to(change_pause))
                .route("/replay", web::get().to(replay_preview))
                .route("/replay", web::post().to(replay_bulk))
                .route("/actions", web::get().to(actions))
                .default_service(web::to(not_found))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)?
        .run();
        Ok(Self { server, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

fn console_config(config: &Config) -> anyhow::Result<&ConsoleConfig> {
    config.console.as_ref().with_context(|| {
        format!(
            "{}: console: no [console] section: add one with at least one token (see docs/configuration.md)",
            config.path.display()
        )
    })
}

/// `hookbox console`: serves until `shutdown`, then lets requests finish.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = console_config(config)?.listen;
    let console = Console::build(config, pool(&config.database_url()?)?)?;
    tracing::info!(address = %listen, port = console.port(), "console serving");
    let handle = console.handle();
    let server = tokio::spawn(console.run_until_stopped());
    shutdown.cancelled().await;
    handle.stop(true).await;
    server.await??;
    Ok(())
}

/// What a page or action can fail with, answered without internal detail.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    BadRequest(String),
    #[error("no such page or event")]
    NotFound,
    #[error("the database did not answer; try again")]
    Database(#[from] sqlx::Error),
}

impl From<FlowError> for ConsoleError {
    fn from(error: FlowError) -> Self {
        match error {
            FlowError::Database(error) => Self::Database(error),
            other => Self::BadRequest(other.to_string().replace("--", "")),
        }
    }
}

impl From<ReplayError> for ConsoleError {
    fn from(error: ReplayError) -> Self {
        match error {
            ReplayError::Database(error) => Self::Database(error),
            other => Self::BadRequest(other.to_string().replace("--", "")),
        }
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Refused(refusal) => refusal.status_code(),
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Refused(refusal) => refusal.error_response(),
            other => {
                if let Self::Database(error) = other {
                    tracing::error!(error = %error, "console query failed");
                }
                HttpResponse::build(other.status_code())
                    .content_type("text/html; charset=utf-8")
                    .body(pages::error_page(other.status_code(), &other.to_string()).into_string())
            }
        }
    }
}

type Page = Result<HttpResponse, ConsoleError>;

fn html(markup: maud::Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(markup.into_string())
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

async fn styles() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(STYLES)
}

async fn script() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(SCRIPT)
}

async fn not_found(_principal: Principal) -> Page {
    Err(ConsoleError::NotFound)
}

async fn login_form() -> HttpResponse {
    html(pages::login(None))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(auth: web::Data<Auth>, form: web::Form<LoginForm>) -> HttpResponse {
    match auth.check_token(form.token.trim().as_bytes()) {
        Some((name, _)) => {
            tracing::info!(token = %name, "console login");
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/"))
                .cookie(auth.session_cookie(&name))
                .finish()
        }
        None => {
            tracing::warn!("console login refused: unknown token");
            HttpResponse::Unauthorized()
                .content_type("text/html; charset=utf-8")
                .body(pages::login(Some("That token is not valid.")).into_string())
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(principal: Principal, auth: web::Data<Auth>, form: web::Form<CsrfForm>) -> Page {
    if let auth::Via::Session(session) = &principal.via {
        if form.csrf.as_deref() != Some(auth.csrf_token(session).as_str()) {
            return Err(Refusal::BadCsrf.into());
        }
    }
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .cookie(auth.logout_cookie())
        .finish())
}

async fn overview(principal: Principal, auth: web::Data<Auth>, state: web::Data<State>) -> Page {
    let (statuses, hour, day, notifications, pauses, circuits) = tokio::try_join!(
        queries::source_health(&state.pool, &state.sources),
        queries::throughput(&state.pool, 3600.0, 300.0),
        queries::throughput(&state.pool, 86_400.0, 3600.0),
        queries::notifications(&state.pool, 10),
        ops::flow::pauses(&state.pool),
        ops::flow::open_circuits(&state.pool),
    )?;
    let view = pages::View::new(&principal, &auth);
    Ok(html(pages::overview(
        &view,
        &statuses,
        &hour,
        &day,
        &notifications,
        &pages::FlowState {
            pauses: &pauses,
            circuits: &circuits,
            handlers: &state.handlers,
        },
    )))
}

/// The filters of `hookbox events list`, as query parameters.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FilterQuery {
    #[serde(default)]
    pub source: Option<String>,
    /// One status, or several separated by commas.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// Payload search: a JSON object to contain, or field = value.
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub before: Option<String>,
}

fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl FilterQuery {
    /// The filter, checked: every part a user typed is validated here.
    pub fn filter(&self) -> Result<EventFilter, ConsoleError> {
        let statuses = present(&self.status)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        parse_status(s).map_err(|known| {
                            ConsoleError::BadRequest(format!("status `{s}`: {known}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let time = |value: &Option<String>| {
            present(value)
                .map(parse_time)
                .transpose()
                .map_err(ConsoleError::BadRequest)
        };
        Ok(EventFilter {
            source: present(&self.source).map(str::to_owned),
            statuses,
            event_type: present(&self.event_type).map(str::to_owned),
            since: time(&self.since)?,
            until: time(&self.until)?,
        })
    }

    fn payload(&self) -> Result<Option<serde_json::Value>, ConsoleError> {
        queries::parse_payload_search(present(&self.q).unwrap_or(""))
            .map_err(ConsoleError::BadRequest)
    }

    /// The query string of this filter, without the page cursor.
    pub fn query_string(&self) -> String {
        let pairs = [
            ("source", &self.source),
            ("status", &self.status),
            ("type", &self.event_type),
            ("since", &self.since),
            ("until", &self.until),
            ("q", &self.q),
        ];
        let mut out = url_encoded(&pairs);
        if out.is_empty() {
            out.push('?');
        } else {
            out.insert(0, '?');
        }
        out
    }
}

fn url_encoded(pairs: &[(&str, &Option<String>)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if let Some(value) = present(value) {
            serializer.append_pair(key, value);
        }
    }
    serializer.finish()
}

async fn events(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    query: web::Query<FilterQuery>,
) -> Page {
    let filter = query.filter()?;
    let payload = query.payload()?;
    let before = present(&query.before)
        .map(|b| b.parse::<Uuid>())
        .transpose()
        .map_err(|_| ConsoleError::BadRequest("`before` is not an event id".into()))?;
    let mut rows = queries::events_page(
        &state.pool,
        &filter,
        payload.as_ref(),
        before,
        PAGE_SIZE + 1,
    )
    .await?;
    let more = rows.len() as i64 > PAGE_SIZE;
    rows.truncate(PAGE_SIZE as usize);
    let view = pages::View::new(&principal, &auth);
    Ok(html(pages::events(
        &view,
        &state.sources,
        &query,
        &rows,
        more,
    )))
}

fn event_id(text: &str) -> Result<Uuid, ConsoleError> {
    text.parse().map_err(|_| ConsoleError::NotFound)
}

#[derive(Deserialize)]
struct Notice {
    replayed: Option<i64>,
}

async fn event(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    id: web::Path<String>,
    notice: web::Query<Notice>,
) -> Page {
    let id = event_id(&id)?;
    let (detail, timeline) = ops::events::show(&state.pool, &EventReference::Id(id), true)
        .await?
        .ok_or(ConsoleError::NotFound)?;
    let view = pages::View::new(&principal, &auth);
    Ok(html(pages::event(
        &view,
        &detail,
        &timeline,
        notice.replayed,
    )))
}

/// A yes/no field from an HTML checkbox (`on`) or JSON (`true`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Text(String),
}

fn flag(value: &Option<Flag>) -> bool {
    match value {
        Some(Flag::Bool(b)) => *b,
        Some(Flag::Text(t)) => matches!(t.as_str(), "on" | "true" | "1" | "yes"),
        None => false,
    }
}

/// The body of an action: a form from a browser or JSON from a script.
#[derive(Debug, Deserialize)]
struct ActionBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    include_succeeded: Option<Flag>,
    #[serde(default)]
    dry_run: Option<Flag>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

type Body = web::Either<web::Form<ActionBody>, web::Json<ActionBody>>;

/// A form from a browser or JSON from a script, whichever came.
fn body<T>(body: web::Either<web::Form<T>, web::Json<T>>) -> T {
    match body {
        web::Either::Left(form) => form.into_inner(),
        web::Either::Right(json) => json.into_inner(),
    }
}

fn replay_request(
    principal: &Principal,
    body: &ActionBody,
    ids: Vec<Uuid>,
    filter: EventFilter,
) -> ReplayRequest {
    ReplayRequest {
        ids,
        filter,
        include_succeeded: flag(&body.include_succeeded),
        reason: body.reason.clone().unwrap_or_default().trim().to_owned(),
        actor: principal.name.clone(),
        batch_size: 1000,
    }
}

/// `POST /events/{id}/replay`: the CLI's `hookbox replay ID` for one event.
async fn replay_one(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    id: web::Path<String>,
    form: Body,
) -> Page {
    let form = body(form);
    principal.authorize_change(&auth, form.csrf.as_deref())?;
    let id = event_id(&id)?;
    let request = replay_request(&principal, &form, vec![id], EventFilter::default());
    let (count, _) = ops::replay::preview(&state.pool, &request, 1).await?;
    if count == 0 {
        return Err(ConsoleError::BadRequest(
            "this event cannot be replayed now: it is pending or processing, or it succeeded and \
             \"include succeeded\" was not chosen"
                .into(),
        ));
    }
    let report = ops::replay::replay(&state.pool, &request, |_| {}).await?;
    tracing::info!(event_id = %id, actor = %principal.name, "replay from the console");
    if principal.wants_json() {
        return Ok(HttpResponse::Ok().json(report));
    }
    Ok(see_other(&format!(
        "/events/{id}?replayed={}",
        report.replayed
    )))
}

impl ActionBody {
    fn filter_query(&self) -> FilterQuery {
        FilterQuery {
            source: self.source.clone(),
            status: self.status.clone(),
            event_type: self.event_type.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            q: None,
            before: None,
        }
    }
}

/// `GET /replay?…`: the dry run, what a bulk replay would touch, and the
/// form that confirms it.
async fn replay_preview(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    query: web::Query<FilterQuery>,
) -> Page {
    let filter = query.filter()?;
    let request = ReplayRequest {
        ids: Vec::new(),
        filter,
        include_succeeded: false,
        reason: "preview".into(),
        actor: principal.name.clone(),
        batch_size: 1000,
    };
    let view = pages::View::new(&principal, &auth);
    match ops::replay::preview(&state.pool, &request, 20).await {
        Ok((count, sample)) => Ok(html(pages::replay_preview(
            &view,
            &query,
            Ok((count, &sample)),
        ))),
        Err(ReplayError::Database(error)) => Err(error.into()),
        Err(other) => Ok(html(pages::replay_preview(
            &view,
            &query,
            Err(&other.to_string().replace("--", "")),
        ))),
    }
}

/// `POST /replay`: bulk replay by filter (`dry_run` answers the count only).
async fn replay_bulk(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    form: Body,
) -> Page {
    let form = body(form);
    principal.authorize_change(&auth, form.csrf.as_deref())?;
    let filter = form.filter_query().filter()?;
    let request = replay_request(&principal, &form, Vec::new(), filter);
    if flag(&form.dry_run) {
        let (count, sample) = ops::replay::preview(&state.pool, &request, 20).await?;
        return Ok(
            HttpResponse::Ok().json(serde_json::json!({ "would_replay": count, "sample": sample }))
        );
    }
    let report = ops::replay::replay(&state.pool, &request, |_| {}).await?;
    if principal.wants_json() {
        return Ok(HttpResponse::Ok().json(report));
    }
    let view = pages::View::new(&principal, &auth);
    Ok(html(pages::replay_done(&view, &report)))
}

/// `POST /events/{id}/skip`: the CLI's `hookbox skip ID` for one event.
async fn skip_one(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    id: web::Path<String>,
    form: Body,
) -> Page {
    let form = body(form);
    principal.authorize_change(&auth, form.csrf.as_deref())?;
    let id = event_id(&id)?;
    let reason = form.reason.clone().unwrap_or_default();
    let report = ops::flow::skip(&state.pool, &[id], &principal.name, reason.trim()).await?;
    if report.skipped == 0 {
        return Err(ConsoleError::BadRequest(
            "this event cannot be skipped now: it is in flight or has finished".into(),
        ));
    }
    tracing::info!(event_id = %id, actor = %principal.name, "skip from the console");
    if principal.wants_json() {
        return Ok(HttpResponse::Ok().json(report));
    }
    Ok(see_other(&format!("/events/{id}")))
}

/// The body of a pause or resume: what, and why.
#[derive(Debug, Deserialize)]
struct PauseBody {
    kind: String,
    name: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    csrf: Option<String>,
}

type PauseForm = web::Either<web::Form<PauseBody>, web::Json<PauseBody>>;

/// `POST /pause` and `POST /resume`: the CLI's `hookbox pause|resume`.
async fn change_pause(
    request: HttpRequest,
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    form: PauseForm,
) -> Page {
    let resume = request.path() == "/resume";
    let form = body(form);
    principal.authorize_change(&auth, form.csrf.as_deref())?;
    let target = match form.kind.as_str() {
        "source" if state.sources.contains(&form.name) => PauseTarget::Source(form.name),
        "handler" if state.handlers.contains(&form.name) => PauseTarget::Handler(form.name),
        _ => return Err(ConsoleError::BadRequest("no such source or handler".into())),
    };
    let reason = form.reason.unwrap_or_default();
    let changed = if resume {
        ops::flow::resume(&state.pool, &target, &principal.name, reason.trim()).await?
    } else {
        ops::flow::pause(&state.pool, &target, &principal.name, reason.trim()).await?
    };
    tracing::info!(actor = %principal.name, %target, resume, "pause changed from the console");
    if principal.wants_json() {
        return Ok(HttpResponse::Ok().json(serde_json::json!({ "changed": changed })));
    }
    Ok(see_other("/"))
}

#[derive(Deserialize)]
struct ActionsQuery {
    before: Option<i64>,
}

async fn actions(
    principal: Principal,
    auth: web::Data<Auth>,
    state: web::Data<State>,
    query: web::Query<ActionsQuery>,
) -> Page {
    let (mut rows, notifications) = tokio::try_join!(
        queries::actions(&state.pool, query.before, PAGE_SIZE + 1),
        queries::notifications(&state.pool, PAGE_SIZE),
    )?;
    let more = rows.len() as i64 > PAGE_SIZE;
    rows.truncate(PAGE_SIZE as usize);
    let view = pages::View::new(&principal, &auth);
    Ok(html(pages::actions(&view, &rows, more, &notifications)))
}
