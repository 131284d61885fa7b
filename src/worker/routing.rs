//! Which handler an event goes to: the first `[[route]]` whose source matches
//! and whose `event_types` globs match the event's type.

use wildmatch::WildMatch;

use crate::config::RouteSection;

pub struct Router {
    routes: Vec<Route>,
}

struct Route {
    source: String,
    event_types: Option<Vec<WildMatch>>,
    handler: String,
}

impl Router {
    pub fn new(sections: &[RouteSection]) -> Self {
        let routes = sections
            .iter()
            .map(|section| Route {
                source: section.source.clone(),
                event_types: section
                    .event_types
                    .as_ref()
                    .map(|globs| globs.iter().map(|g| WildMatch::new(g)).collect()),
                handler: section.handler.clone(),
            })
            .collect();
        Self { routes }
    }

    pub fn route(&self, source: &str, event_type: Option<&str>) -> Option<&str> {
        self.routes
            .iter()
            .find(|route| {
                route.source == source
                    && match (&route.event_types, event_type) {
                        (None, _) => true,
                        (Some(globs), Some(kind)) => globs.iter().any(|g| g.matches(kind)),
                        (Some(_), None) => false,
                    }
            })
            .map(|route| route.handler.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(source: &str, types: Option<&[&str]>, handler: &str) -> RouteSection {
        RouteSection {
            source: source.into(),
            event_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
            handler: handler.into(),
        }
    }

    #[test]
    fn the_first_matching_route_wins() {
        let router = Router::new(&[
            route("begini", Some(&["psychometric_score.*"]), "scores"),
            route("begini", None, "everything"),
        ]);
        assert_eq!(
            router.route("begini", Some("psychometric_score.complete")),
            Some("scores")
        );
        assert_eq!(
            router.route("begini", Some("application.expired")),
            Some("everything")
        );
        assert_eq!(router.route("begini", None), Some("everything"));
        assert_eq!(router.route("stripe", Some("x")), None);
    }

    #[test]
    fn an_event_without_a_type_matches_only_untyped_routes() {
        let router = Router::new(&[route("s", Some(&["*"]), "h")]);
        assert_eq!(router.route("s", None), None);
    }
}
