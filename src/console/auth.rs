//! Who is asking: a named token, sent as `Authorization: Bearer` by scripts
//! or exchanged once for a session cookie by browsers.
//!
//! The cookie holds no token: it is `expiry.name.mac`, an HMAC-SHA256 under a
//! key drawn at start (so restarting the console logs every browser out) over
//! the token's name and the expiry. A form's CSRF token is another HMAC, over
//! the session cookie, so it is valid only alongside that cookie.

use std::{future::Future, pin::Pin, time::Duration};

use actix_web::{
    cookie::{time::Duration as CookieDuration, Cookie, SameSite},
    http::{header, StatusCode},
    web, FromRequest, HttpRequest, HttpResponse, ResponseError,
};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    config::{ConsoleConfig, Role},
    secret::Secret,
};

pub const SESSION_COOKIE: &str = "hookbox_session";

/// The console's tokens and its session key.
pub struct Auth {
    /// SHA-256 of each token: compared in constant time whatever the length.
    tokens: Vec<(String, [u8; 32], Role)>,
    session_key: Secret,
    session: Duration,
    secure_cookie: bool,
}

/// How the caller proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Bearer,
    /// With the cookie's value, to check the CSRF token against.
    Session(String),
}

/// An authenticated caller: the token's name is the actor of its actions.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub via: Via,
}

/// Why a request is refused before anything is read or written.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A browser without a session: sent to the login page.
    #[error("log in first")]
    LoginNeeded,
    /// A script with a missing or wrong token.
    #[error("a valid bearer token is required")]
    BadToken,
    #[error("this needs an operator token")]
    NotOperator,
    #[error("the form is stale or forged (CSRF token missing or wrong): reload the page")]
    BadCsrf,
}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::LoginNeeded => StatusCode::SEE_OTHER,
            Self::BadToken => StatusCode::UNAUTHORIZED,
            Self::NotOperator | Self::BadCsrf => StatusCode::FORBIDDEN,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::LoginNeeded => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/login"))
                .finish(),
            Self::BadToken => HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(serde_json::json!({ "detail": self.to_string() })),
            _ => HttpResponse::build(self.status_code())
                .json(serde_json::json!({ "detail": self.to_string() })),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Auth {
    pub fn new(config: &ConsoleConfig) -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            tokens: config
                .tokens
                .iter()
                .map(|t| (t.name.clone(), digest(t.token.expose()), t.role))
                .collect(),
            session_key: Secret::new(key.to_vec()),
            session: config.session,
            secure_cookie: !config.listen.ip().is_loopback(),
        }
    }

    /// The token's name and role, if `presented` is one of the tokens. Every
    /// token is compared, so the time taken says nothing about which matched.
    pub fn check_token(&self, presented: &[u8]) -> Option<(String, Role)> {
        let presented = digest(presented);
        let mut found = None;
        for (name, token, role) in &self.tokens {
            if bool::from(token.ct_eq(&presented)) {
                found = Some((name.clone(), *role));
            }
        }
        found
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.session_key.expose()).expect("any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// A session cookie for the token named `name`.
    pub fn session_cookie(&self, name: &str) -> Cookie<'static> {
        let expires = chrono::Utc::now().timestamp() + self.session.as_secs() as i64;
        let expiry = expires.to_string();
        let tag = self
            .mac(&[b"session", expiry.as_bytes(), name.as_bytes()])
            .finalize()
            .into_bytes();
        let value = format!("{expiry}.{}.{}", hex::encode(name), hex::encode(tag));
        Cookie::build(SESSION_COOKIE, value)
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure_cookie)
            .max_age(CookieDuration::seconds(self.session.as_secs() as i64))
            .finish()
    }

    pub fn logout_cookie(&self) -> Cookie<'static> {
        let mut cookie = Cookie::build(SESSION_COOKIE, "")
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure_cookie)
            .finish();
        cookie.make_removal();
        cookie
    }

    /// The session's token name, if the cookie is genuine, unexpired, and its
    /// token is still configured (with the role it has now).
    fn check_session(&self, value: &str) -> Option<(String, Role)> {
        let mut parts = value.splitn(3, '.');
        let (expiry, name, tag) = (parts.next()?, parts.next()?, parts.next()?);
        let name = String::from_utf8(hex::decode(name).ok()?).ok()?;
        let tag = hex::decode(tag).ok()?;
        self.mac(&[b"session", expiry.as_bytes(), name.as_bytes()])
            .verify_slice(&tag)
            .ok()?;
        if expiry.parse::<i64>().ok()? < chrono::Utc::now().timestamp() {
            return None;
        }
        let role = self.tokens.iter().find(|(n, _, _)| *n == name)?.2;
        Some((name, role))
    }

    /// The CSRF token the forms of this session carry.
    pub fn csrf_token(&self, session: &str) -> String {
        hex::encode(
            self.mac(&[b"csrf", session.as_bytes()])
                .finalize()
                .into_bytes(),
        )
    }

    fn csrf_matches(&self, session: &str, presented: &str) -> bool {
        match hex::decode(presented) {
            Ok(tag) => self
                .mac(&[b"csrf", session.as_bytes()])
                .verify_slice(&tag)
                .is_ok(),
            Err(_) => false,
        }
    }

    fn principal(&self, request: &HttpRequest) -> Result<Principal, Refusal> {
        if let Some(value) = request.headers().get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or(Refusal::BadToken)?;
            let (name, role) = self
                .check_token(token.trim().as_bytes())
                .ok_or(Refusal::BadToken)?;
            return Ok(Principal {
                name,
                role,
                via: Via::Bearer,
            });
        }
        let cookie = request.cookie(SESSION_COOKIE).ok_or(Refusal::LoginNeeded)?;
        let (name, role) = self
            .check_session(cookie.value())
            .ok_or(Refusal::LoginNeeded)?;
        Ok(Principal {
            name,
            role,
            via: Via::Session(cookie.value().to_owned()),
        })
    }
}

impl Principal {
    /// May this caller change anything with this form? Operators only, and a
    /// browser's form must carry its session's CSRF token. Checked before
    /// anything is written.
    pub fn authorize_change(&self, auth: &Auth, csrf: Option<&str>) -> Result<(), Refusal> {
        if let Via::Session(session) = &self.via {
            if !csrf.is_some_and(|token| auth.csrf_matches(session, token)) {
                return Err(Refusal::BadCsrf);
            }
        }
        if self.role != Role::Operator {
            return Err(Refusal::NotOperator);
        }
        Ok(())
    }

    /// The CSRF token for this caller's forms (none for scripts).
    pub fn csrf(&self, auth: &Auth) -> String {
        match &self.via {
            Via::Session(session) => auth.csrf_token(session),
            Via::Bearer => String::new(),
        }
    }

    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// Scripts get JSON answers; browsers get pages and redirects.
    pub fn wants_json(&self) -> bool {
        self.via == Via::Bearer
    }
}

impl FromRequest for Principal {
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(request: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let result = match request.app_data::<web::Data<Auth>>() {
            Some(auth) => auth.principal(request),
            None => Err(Refusal::BadToken),
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleToken;

    fn auth() -> Auth {
        Auth::new(&ConsoleConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens: vec![
                ConsoleToken {
                    name: "ops".into(),
                    token: Secret::new(b"operator-token-0123456789".to_vec()),
                    role: Role::Operator,
                },
                ConsoleToken {
                    name: "audit".into(),
                    token: Secret::new(b"viewer-token-0123456789ab".to_vec()),
                    role: Role::Viewer,
                },
            ],
            session: Duration::from_secs(3600),
        })
    }

    #[test]
    fn tokens_are_recognised_only_exactly() {
        let auth = auth();
        assert_eq!(
            auth.check_token(b"operator-token-0123456789"),
            Some(("ops".into(), Role::Operator))
        );
        assert_eq!(auth.check_token(b"operator-token-012345678"), None);
        assert_eq!(auth.check_token(b""), None);
    }

    #[test]
    fn session_cookies_hold_no_token_and_cannot_be_forged() {
        let auth = auth();
        let cookie = auth.session_cookie("audit");
        assert!(!cookie.value().contains("viewer-token"));
        assert!(cookie.http_only().unwrap());
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(
            auth.check_session(cookie.value()),
            Some(("audit".into(), Role::Viewer))
        );
        // Claiming another name with the same tag fails.
        let forged = cookie
            .value()
            .replacen(&hex::encode("audit"), &hex::encode("ops"), 1);
        assert_eq!(auth.check_session(&forged), None);
        // Another process's key does not verify it.
        assert_eq!(super::tests::auth().check_session(cookie.value()), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let auth = auth();
        let one = auth.session_cookie("ops");
        let token = auth.csrf_token(one.value());
        assert!(auth.csrf_matches(one.value(), &token));
        assert!(!auth.csrf_matches("another-session", &token));
        assert!(!auth.csrf_matches(one.value(), ""));
    }
}
